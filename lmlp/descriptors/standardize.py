"""Per-function standardisation of descriptors with training-set statistics."""

from __future__ import annotations

import torch

MIN_STD = 1e-8
"""Functions whose training standard deviation is below this are only shifted, not scaled."""


class Standardizer(torch.nn.Module):
    """G' = (G − mean) / std per function; saved with the model as buffers.

    Args:
        mean, std: (F,) statistics of the training descriptors.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", torch.where(std < MIN_STD, torch.ones_like(std), std).detach().clone())

    @classmethod
    def fit(cls, G: torch.Tensor) -> Standardizer:
        """Statistics of training descriptors G (N, F), population standard deviation."""
        return cls(G.mean(dim=0), G.std(dim=0, correction=0))

    def forward(self, G: torch.Tensor) -> torch.Tensor:
        """(N, F) standardised descriptors."""
        return (G - self.mean.to(G.dtype)) / self.std.to(G.dtype)
