"""drainproxy: a graceful-shutdown reverse-proxy sidecar for Kubernetes."""

__version__ = "0.1.0"
