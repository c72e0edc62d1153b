"""Radial and angular symmetry-function terms of one pair or triple, before element weights.

All functions broadcast over leading dimensions: a pair vector ``r_ij`` is (..., 3) in Å, so the
same code serves a batch and, under ``torch.func.vmap``, one pair at a time.
"""

from __future__ import annotations

import math

import torch


def cosine_cutoff(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """f_c(r) = ½[cos(π r / R_c) + 1] for r < R_c, else 0. Value and slope vanish at R_c."""
    inside = r < cutoff
    return torch.where(inside, 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0), torch.zeros_like(r))


def radial_terms(r_ij: torch.Tensor, eta: torch.Tensor, r_s: torch.Tensor, cutoff: float) -> torch.Tensor:
    """exp(−η (r − r_s)²) f_c(r) for every (η, r_s) pair.

    Args:
        r_ij: (..., 3) pair vectors, Å.
        eta: (K,) Å⁻². r_s: (K,) Å.
    Returns:
        (..., K)
    """
    r = torch.linalg.vector_norm(r_ij, dim=-1)[..., None]
    return torch.exp(-eta * (r - r_s) ** 2) * cosine_cutoff(r, cutoff)


def angular_terms(
    r_ij: torch.Tensor,
    r_ik: torch.Tensor,
    eta: torch.Tensor,
    lam: torch.Tensor,
    zeta: torch.Tensor,
    cutoff: float,
    g4: bool,
) -> torch.Tensor:
    """2^{1−ζ} (1 + λ cos θ_ijk)^ζ exp(−η (r_ij² + r_ik²)) f_c(r_ij) f_c(r_ik) per (η, (λ, ζ)).

    The G4 form multiplies each term by exp(−η r_jk²) f_c(r_jk) as well.

    Args:
        r_ij, r_ik: (..., 3) the two pair vectors from the centre, Å.
        eta: (E,) Å⁻². lam, zeta: (L,) the (λ, ζ) combinations.
    Returns:
        (..., E, L)
    """
    # Distances keep a trailing axis of 1: under vmap, 0-d tensors times Python floats get
    # float64 forward-mode tangents in torch 2.13.
    a = torch.linalg.vector_norm(r_ij, dim=-1, keepdim=True)
    b = torch.linalg.vector_norm(r_ik, dim=-1, keepdim=True)
    cos = (r_ij * r_ik).sum(-1, keepdim=True) / (a * b)
    exponent = a**2 + b**2
    envelope = cosine_cutoff(a, cutoff) * cosine_cutoff(b, cutoff)
    if g4:
        d = torch.linalg.vector_norm(r_ik - r_ij, dim=-1, keepdim=True)
        exponent = exponent + d**2
        envelope = envelope * cosine_cutoff(d, cutoff)
    radial = torch.exp(-eta * exponent) * envelope
    angular = 2.0 ** (1.0 - zeta) * (1.0 + lam * cos).clamp(min=0.0) ** zeta
    return radial[..., :, None] * angular[..., None, :]
