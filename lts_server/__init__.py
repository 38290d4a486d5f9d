"""lts-server: a self-hosted license tracking server."""

__version__ = "0.1.0"
