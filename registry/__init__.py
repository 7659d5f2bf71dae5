"""An OCI Distribution Specification v1.1 registry server."""

__version__ = "0.1.0"
