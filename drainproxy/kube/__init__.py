"""Beside control: Kubernetes tooling (``check``, ``inject``, the admission webhook). Imports
config, system and core; never the data plane or control."""
