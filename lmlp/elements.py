"""Elements lmlp supports (H to Xe, Z = 1..54) and their periodic-table properties.

The eeACSF weights (docs/method.md: element properties and weights) use, per element, the period ``n`` (1..5), the valence s+p
electrons ``n_sp`` (1..8, He counts 8) and the d electrons ``n_d`` (0..10, 0 for main-group
elements). Our choice for the transition metals: Aufbau (Madelung-rule) configurations, ns² (n−1)dᵏ,
without the ground-state exceptions (Cr, Cu, Nb, Mo, Ru, Rh, Pd, Ag), so the properties change
regularly along a period and stay inside the ranges above. Zn and Cd count 10 d electrons; Ga–Kr
and In–Xe count as main-group (n_d = 0).
"""

from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols

MAX_Z = 54

WEIGHT_TYPE_MAX = np.array([1, 5, 8, 10, 5, 8, 10], dtype=np.float64)
"""Normalisers of h_t for the seven weight types t = 0..6: the maximum over H–Xe, except for t = 6,
whose h_6 reaches 11 (kept at 10, so that models with type-6 weights keep their descriptors)."""


def symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` (``"Z=200"`` outside the periodic table)."""
    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def _properties() -> np.ndarray:
    """(MAX_Z + 1, 3) int table of (period, n_sp, n_d); row 0 is unused."""
    table = np.zeros((MAX_Z + 1, 3), dtype=np.int64)
    period_starts = [(1, 1), (3, 2), (11, 3), (19, 4), (37, 5)]
    for start, period in period_starts:
        end = {1: 2, 2: 10, 3: 18, 4: 36, 5: 54}[period]
        for z in range(start, end + 1):
            k = z - start  # position in the period
            if period == 1:
                n_sp, n_d = (1, 0) if z == 1 else (8, 0)
            elif period <= 3:
                n_sp, n_d = k + 1, 0
            elif k < 2:
                n_sp, n_d = k + 1, 0
            elif k < 12:
                n_sp, n_d = 2, k - 1
            else:
                n_sp, n_d = k - 9, 0
            table[z] = period, n_sp, n_d
    return table


PROPERTIES = _properties()
"""(MAX_Z + 1, 3) period, valence s+p electrons, d electrons for Z = 1..54."""


def weight_table() -> np.ndarray:
    """(MAX_Z + 1, 7) float64 values h_t(Z) of the seven eeACSF weight types (not normalised).

    h_0 = 1, h_1 = n, h_2 = n_sp, h_3 = n_d, h_4 = 6 − n, h_5 = 9 − n_sp, h_6 = 11 − n_d.
    """
    n, n_sp, n_d = PROPERTIES.T.astype(np.float64)
    h = np.stack([np.ones_like(n), n, n_sp, n_d, 6 - n, 9 - n_sp, 11 - n_d], axis=1)
    h[0] = 0.0
    return h
