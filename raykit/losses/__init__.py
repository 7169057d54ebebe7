"""Losses on embeddings. They never touch the model: the training loop encodes, a loss scores."""

from raykit.losses.mnr import mnr_loss

__all__ = ["mnr_loss"]
