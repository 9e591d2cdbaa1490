"""Layer 1, config: the YAML schema, its defaults and its cross-field rules, each declared once.

Imports nothing of drainproxy but ``errors``."""
