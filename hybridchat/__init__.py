"""hybridchat: small hybrid attention/Mamba-2 chat models that answer from retrieved knowledge."""

__version__ = "0.1.0"
