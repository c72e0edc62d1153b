"""``find_neighbors`` on periodic and large structures (vesin's cell list) against ASE's ``neighbor_list``."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list

from lmlp.descriptors import neighbors
from lmlp.descriptors.neighbors import ALL_PAIRS_MAX_ATOMS, find_neighbors
from lmlp.errors import DataError

TRICLINIC = np.array([[6.0, 0.0, 0.0], [2.0, 5.5, 0.0], [1.5, -1.0, 5.0]])


def jittered(n: int, spacing: float, seed: int) -> np.ndarray:
    """(n, 3) positions in Å on a cubic lattice of ``spacing`` Å, each moved by up to 0.3 Å per axis."""
    rng = np.random.default_rng(seed)
    m = int(np.ceil(n ** (1 / 3)))
    sites = np.stack(np.meshgrid(*[np.arange(m)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    return sites * spacing + rng.uniform(-0.3, 0.3, (n, 3))


def ase_rows(positions: np.ndarray, cell: np.ndarray, pbc: list[bool], cutoff: float, start: int = 0) -> np.ndarray:
    """(P, 5) rows (i + start, j + start, Cartesian shift in Å) of ASE's neighbour list."""
    i, j, shift = neighbor_list("ijS", Atoms(positions=positions, cell=cell, pbc=pbc), cutoff)
    return np.column_stack([i + start, j + start, shift @ cell])


def lmlp_rows(nb: neighbors.Neighbors) -> np.ndarray:
    """(P, 5) rows (i, j, Cartesian shift in Å) of ``nb``."""
    return np.column_stack([nb.pairs.T.numpy(), nb.shifts.double().numpy()])


def assert_same_pairs(got: np.ndarray, expected: np.ndarray, atol: float = 1e-9) -> None:
    """Same (i, j, shift) rows in any order; shifts to ``atol`` Å."""
    def ordered(rows):
        return rows[np.lexsort(np.round(rows, 3).T[::-1])]

    assert got.shape == expected.shape
    np.testing.assert_allclose(ordered(got), ordered(expected), rtol=0, atol=atol)


def one(
    positions: np.ndarray, cutoff: float, cell: np.ndarray | None = None, pbc: list[bool] | None = None
) -> neighbors.Neighbors:
    """``find_neighbors`` on the single structure ``positions``."""
    return find_neighbors(torch.from_numpy(positions), torch.tensor([0, len(positions)]), cutoff,
                          None if cell is None else torch.from_numpy(cell)[None],
                          None if pbc is None else torch.tensor([pbc]))


def test_triclinic_cell_matches_ase():
    positions = np.random.default_rng(0).uniform(-0.2, 1.2, (40, 3)) @ TRICLINIC
    nb = one(positions, 4.5, TRICLINIC, [True, True, True])
    expected = ase_rows(positions, TRICLINIC, [True] * 3, 4.5)
    assert len(expected) > 40 * 10
    assert_same_pairs(lmlp_rows(nb), expected)


def test_small_cell_multiple_images_matches_ase():
    cell = TRICLINIC / 3
    positions = np.array([[0.1, 0.2, 0.3], [1.0, 0.9, 0.8]])
    nb = one(positions, 6.0, cell, [True, True, True])
    assert_same_pairs(lmlp_rows(nb), ase_rows(positions, cell, [True] * 3, 6.0))
    own = nb.pairs[0] == nb.pairs[1]
    assert own.sum() > 100 and (nb.shifts[own].norm(dim=1) > 1.0).all()
    images = nb.shifts.numpy() @ np.linalg.inv(cell)
    assert (np.abs(images).max(axis=0) > 2.5).all()


@pytest.mark.parametrize("third", [[0.0, 0.0, 0.0], [1.0, 0.5, 4.0]], ids=["zero", "oblique"])
def test_mixed_pbc_matches_ase(third):
    cell = np.array([TRICLINIC[0], TRICLINIC[1], third])
    positions = np.random.default_rng(1).uniform(0, 1, (50, 3)) @ TRICLINIC * [1, 1, 2]
    nb = one(positions, 5.0, cell, [True, True, False])
    assert_same_pairs(lmlp_rows(nb), ase_rows(positions, cell, [True, True, False], 5.0))
    assert (nb.shifts.norm(dim=1) > 0).any()


@pytest.mark.parametrize("cell", [None, np.zeros((3, 3))], ids=["no cell", "zero cell"])
def test_large_cluster_matches_ase_and_all_pairs(cell, monkeypatch):
    positions = jittered(ALL_PAIRS_MAX_ATOMS + 44, 2.15, seed=2)
    nb = one(positions, 6.0, cell, None if cell is None else [False] * 3)
    assert_same_pairs(lmlp_rows(nb), ase_rows(positions, np.zeros((3, 3)), [False] * 3, 6.0))
    assert (nb.shifts == 0).all()
    monkeypatch.setattr(neighbors, "ALL_PAIRS_MAX_ATOMS", len(positions))
    assert_same_pairs(lmlp_rows(one(positions, 6.0, cell)), lmlp_rows(nb))


def test_batch_of_molecules_and_periodic_structures_is_union_with_offsets():
    rng = np.random.default_rng(3)
    slab = np.array([TRICLINIC[0], TRICLINIC[1], np.zeros(3)])
    parts = [  # (positions, cell, pbc)
        (jittered(6, 1.5, seed=4), np.zeros((3, 3)), [False] * 3),
        (rng.uniform(0, 1, (30, 3)) @ TRICLINIC, TRICLINIC, [True] * 3),
        (jittered(7, 1.5, seed=5), np.zeros((3, 3)), [False] * 3),
        (jittered(ALL_PAIRS_MAX_ATOMS + 1, 2.15, seed=6), np.zeros((3, 3)), [False] * 3),
        (rng.uniform(0, 1, (20, 3)) @ TRICLINIC, slab, [True, True, False]),
    ]
    counts = [len(p) for p, _, _ in parts]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    positions = torch.from_numpy(np.concatenate([p for p, _, _ in parts])).float()
    nb = find_neighbors(positions, torch.from_numpy(offsets), 5.0, torch.from_numpy(np.stack([c for _, c, _ in parts])),
                        torch.tensor([b for _, _, b in parts]))
    expected = np.concatenate([ase_rows(p.astype(np.float32), c, b, 5.0, start)
                               for (p, c, b), start in zip(parts, offsets[:-1])])
    assert nb.pairs.dtype == torch.int64 and nb.shifts.dtype == torch.float32
    assert_same_pairs(lmlp_rows(nb), expected, atol=1e-5)


@pytest.mark.parametrize("cell", [np.zeros((3, 3)), np.diag([5.0, 5.0, 0.0])], ids=["zero", "flat"])
def test_periodic_along_degenerate_cell_is_a_data_error(cell):
    with pytest.raises(DataError, match="linearly dependent"):
        one(jittered(8, 1.5, seed=7), 4.0, cell, [True, True, True])
