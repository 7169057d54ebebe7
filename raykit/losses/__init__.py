"""Losses on embeddings. They never touch the model: the training loop encodes, a loss scores."""

from raykit.losses.distill import kl_loss, margin_mse_loss
from raykit.losses.matryoshka import matryoshka_loss
from raykit.losses.mnr import mnr_loss

__all__ = ["kl_loss", "margin_mse_loss", "matryoshka_loss", "mnr_loss"]
