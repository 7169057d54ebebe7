"""raykit: fine-tune text embedding models on Ray and re-embed corpora with them."""

__version__ = "0.1.0"
