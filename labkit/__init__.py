"""labkit: a notebook-based research kit for deep metric learning (image retrieval by embeddings)."""

__version__ = "0.1.0"
