"""attnforge: a compiler for the attention in PyTorch models."""
__version__ = "0.1.0"
