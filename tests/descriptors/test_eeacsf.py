import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.elements import PROPERTIES, WEIGHT_TYPE_MAX, weight_table

CUTOFF = 6.0
PARAMS = dict(
    cutoff=CUTOFF,
    radial_eta=[0.0, 0.5, 0.5, 2.0],
    radial_rs=[0.0, 1.5, 3.0, 4.5],
    angular_eta=[0.01, 0.2],
    angular_lambda=[-1.0, 1.0],
    angular_zeta=[1.0, 2.5],
    radial_types=[0, 1, 2, 3, 4, 5, 6],
    angular_types=[0, 1, 3, 5],
    angular_pair_weights=["sum", "difference"],
)
MIXED = [1, 6, 7, 8, 9, 17, 35, 53, 26]


ANGULAR_CUTOFF = 4.0
CUTOFF_VALUES = {
    "cos": lambda x: 0.5 * (math.cos(math.pi * x) + 1),
    "poly1": lambda x: 2 * x**3 - 3 * x**2 + 1,
    "poly2": lambda x: -6 * x**5 + 15 * x**4 - 10 * x**3 + 1,
}


def descriptor(form: str = "g5", angular_cutoff: float | None = None, cutoff_function: str = "cos") -> SymmetryFunctions:
    return SymmetryFunctions(**PARAMS, angular_form=form, angular_cutoff=angular_cutoff,
                             cutoff_function=cutoff_function)


def random_cluster(n: int, seed: int, spread: float = 1.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random atoms (mixed elements incl. Fe) at least 0.9 Å apart, float64 positions in Å."""
    rng = np.random.default_rng(seed)
    pos = []
    scale = spread * n ** (1 / 3)
    while len(pos) < n:
        p = rng.uniform(-scale, scale, 3)
        if all(np.linalg.norm(p - q) > 0.9 for q in pos):
            pos.append(p)
    return torch.tensor(rng.choice(MIXED, n)), torch.tensor(np.array(pos))


def batch(*molecules):
    numbers = torch.cat([m[0] for m in molecules])
    positions = torch.cat([m[1] for m in molecules])
    offsets = torch.tensor([0] + list(itertools.accumulate(len(m[0]) for m in molecules)))
    return numbers, positions, offsets


def loop_reference(numbers, positions, form="g5", angular_cutoff=CUTOFF, cutoff_function="cos") -> np.ndarray:
    """Slow, obviously correct eeACSF: the formulas of docs/method.md with explicit loops (one molecule)."""
    h = weight_table()
    w = h / WEIGHT_TYPE_MAX
    z, r = numbers.numpy(), positions.numpy()
    n = len(z)
    f = CUTOFF_VALUES[cutoff_function]
    fc = lambda d: f(d / CUTOFF) if d < CUTOFF else 0.0
    fa = lambda d: f(d / angular_cutoff) if d < angular_cutoff else 0.0
    out = []
    for i in range(n):
        feats = []
        for t in PARAMS["radial_types"]:
            for eta, rs in zip(PARAMS["radial_eta"], PARAMS["radial_rs"]):
                g = 0.0
                for j in range(n):
                    d = np.linalg.norm(r[j] - r[i])
                    if j != i and d < CUTOFF:
                        g += w[z[j], t] * math.exp(-eta * (d - rs) ** 2) * fc(d)
                feats.append(g)
        for t in PARAMS["angular_types"]:
            for kind in PARAMS["angular_pair_weights"]:
                if kind == "difference" and t == 0:
                    continue
                for eta in PARAMS["angular_eta"]:
                    for lam in PARAMS["angular_lambda"]:
                        for zeta in PARAMS["angular_zeta"]:
                            g = 0.0
                            for j in range(n):
                                for k in range(j + 1, n):
                                    if i in (j, k):
                                        continue
                                    a, b = r[j] - r[i], r[k] - r[i]
                                    da, db, dc = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(b - a)
                                    if da >= angular_cutoff or db >= angular_cutoff:
                                        continue
                                    if kind == "sum":
                                        weight = (w[z[j], t] + w[z[k], t]) / 2
                                    else:
                                        weight = (abs(h[z[j], t] - h[z[k], t]) + 1) / WEIGHT_TYPE_MAX[t]
                                    cos = a @ b / (da * db)
                                    term = (2 ** (1 - zeta) * (1 + lam * cos) ** zeta
                                            * math.exp(-eta * (da**2 + db**2)) * fa(da) * fa(db))
                                    if form == "g4":
                                        term *= math.exp(-eta * dc**2) * fa(dc)
                                    g += weight * term
                            feats.append(g)
        out.append(feats)
    return np.array(out)


def test_element_table_spot_checks():
    assert PROPERTIES[1].tolist() == [1, 1, 0]
    assert PROPERTIES[2].tolist() == [1, 8, 0]
    assert PROPERTIES[6].tolist() == [2, 4, 0]
    assert PROPERTIES[17].tolist() == [3, 7, 0]
    assert PROPERTIES[26].tolist() == [4, 2, 6]
    assert PROPERTIES[30].tolist() == [4, 2, 10]
    assert PROPERTIES[35].tolist() == [4, 7, 0]
    assert PROPERTIES[53].tolist() == [5, 7, 0]
    assert PROPERTIES[54].tolist() == [5, 8, 0]


@pytest.mark.parametrize("form", ["g5", "g4"])
@pytest.mark.parametrize(("n", "seed"), [(2, 0), (6, 1), (13, 2), (30, 3)])
def test_vectorised_equals_loop_reference(form, n, seed):
    numbers, positions = random_cluster(n, seed)
    sf = descriptor(form)
    G = sf(numbers, positions, torch.tensor([0, n]))
    assert G.shape == (n, sf.n_functions)
    np.testing.assert_allclose(G.numpy(), loop_reference(numbers, positions, form), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("form", ["g5", "g4"])
@pytest.mark.parametrize("cutoff_function", ["cos", "poly1", "poly2"])
def test_separate_angular_cutoff_and_cutoff_functions_equal_loop_reference(form, cutoff_function):
    numbers, positions = random_cluster(13, 2)
    sf = descriptor(form, ANGULAR_CUTOFF, cutoff_function)
    G = sf(numbers, positions, torch.tensor([0, 13]))
    expected = loop_reference(numbers, positions, form, ANGULAR_CUTOFF, cutoff_function)
    np.testing.assert_allclose(G.numpy(), expected, rtol=1e-12, atol=1e-13)
    assert (G != descriptor(form, None, cutoff_function)(numbers, positions, torch.tensor([0, 13]))).any()


def test_molecules_in_a_batch_do_not_see_each_other():
    a, b = random_cluster(7, 4), random_cluster(9, 5)
    sf = descriptor()
    together = sf(*batch(a, b))
    alone = torch.cat([sf(*batch(a)), sf(*batch(b))])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_invariant_under_rotation_translation_and_permutation():
    numbers, positions = random_cluster(12, 6)
    sf = descriptor()
    G = sf(numbers, positions, torch.tensor([0, 12]))
    rot = torch.tensor(Rotation.random(random_state=1).as_matrix())
    moved = positions @ rot.T + torch.tensor([3.0, -7.0, 11.0], dtype=torch.float64)
    torch.testing.assert_close(sf(numbers, moved, torch.tensor([0, 12])), G, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    permuted = sf(numbers[perm], positions[perm], torch.tensor([0, 12]))
    torch.testing.assert_close(permuted, G[perm], rtol=1e-12, atol=1e-12)


def dense_jacobian(derivatives, n, n_functions):
    dense = torch.zeros(n, n_functions, n, 3, dtype=torch.float64)
    for m in range(len(derivatives.centre)):
        dense[derivatives.centre[m], :, derivatives.atom[m]] += derivatives.values[m]
    return dense


def finite_difference_jacobian(sf, numbers, positions, offsets, h=1e-5):
    n = len(numbers)
    out = torch.zeros(n, sf.n_functions, n, 3, dtype=torch.float64)
    for a in range(n):
        for x in range(3):
            plus, minus = positions.clone(), positions.clone()
            plus[a, x] += h
            minus[a, x] -= h
            out[:, :, a, x] = (sf(numbers, plus, offsets) - sf(numbers, minus, offsets)) / (2 * h)
    return out


@pytest.mark.parametrize(("form", "angular_cutoff", "cutoff_function"),
                         [("g5", None, "cos"), ("g4", None, "cos"), ("g5", ANGULAR_CUTOFF, "poly2"),
                          ("g4", ANGULAR_CUTOFF, "poly1")])
def test_derivatives_equal_finite_differences_including_near_cutoff(form, angular_cutoff, cutoff_function):
    numbers, positions = random_cluster(8, 7, spread=2.2)
    positions[1] = positions[0] + torch.tensor([CUTOFF - 0.02, 0.0, 0.0], dtype=torch.float64)
    positions[2] = positions[0] + torch.tensor([0.0, CUTOFF - 0.005, 0.0], dtype=torch.float64)
    positions[3] = positions[0] + torch.tensor([0.0, 0.0, ANGULAR_CUTOFF - 0.01], dtype=torch.float64)
    offsets = torch.tensor([0, 8])
    sf = descriptor(form, angular_cutoff, cutoff_function)
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    torch.testing.assert_close(G, sf(numbers, positions, offsets), rtol=0, atol=0)
    analytic = dense_jacobian(derivatives, 8, sf.n_functions)
    numeric = finite_difference_jacobian(sf, numbers, positions, offsets)
    scale = numeric.abs().amax(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
    assert ((analytic - numeric).abs() / scale).max() < 1e-6


def test_sparse_and_autograd_forces_agree():
    molecules = [random_cluster(n, seed) for n, seed in [(6, 8), (11, 9), (3, 10)]]
    numbers, positions, offsets = batch(*molecules)
    sf = descriptor()
    weights = torch.randn(sf.n_functions, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    sparse = derivatives.forces((1 - torch.tanh(G) ** 2) * weights, len(numbers))
    p = positions.clone().requires_grad_(True)
    energy = (torch.tanh(sf(numbers, p, offsets)) * weights).sum()
    (grad,) = torch.autograd.grad(energy, p)
    torch.testing.assert_close(sparse, -grad, rtol=1e-12, atol=1e-12)


def test_functions_and_derivatives_vanish_continuously_at_cutoff():
    sf = descriptor()
    numbers = torch.tensor([6, 17])
    values, slopes = [], []
    for d in [CUTOFF - 1e-3, CUTOFF - 1e-4, CUTOFF - 1e-5, CUTOFF, CUTOFF + 1e-3]:
        pos = torch.tensor([[0.0, 0, 0], [d, 0, 0]], dtype=torch.float64)
        G, der = sf.with_derivatives(numbers, pos, torch.tensor([0, 2]))
        values.append(G.abs().max().item())
        slopes.append(der.values.abs().max().item())
    assert values[0] > values[1] > values[2] and values[2] < 1e-9 and values[3] == values[4] == 0
    assert slopes[0] > slopes[1] > slopes[2] and slopes[2] < 1e-5 and slopes[3] == slopes[4] == 0


def test_periodic_large_cell_equals_molecule_and_images_count():
    numbers, positions = random_cluster(6, 11)
    sf = descriptor()
    molecule = sf(numbers, positions, torch.tensor([0, 6]))
    cell = torch.eye(3, dtype=torch.float64)[None] * 40.0
    pbc = torch.ones(1, 3, dtype=torch.bool)
    periodic = sf(numbers, positions + 20.0, torch.tensor([0, 6]), cell, pbc)
    torch.testing.assert_close(periodic, molecule, rtol=1e-12, atol=1e-12)
    # a periodic cell of 7 Å equals the central copy of a 3x3x3 supercell cluster
    small = torch.eye(3, dtype=torch.float64)[None] * 7.0
    inside = torch.remainder(positions, 7.0)
    G_periodic, der = sf.with_derivatives(numbers, inside, torch.tensor([0, 6]), small, pbc)
    shifts = torch.tensor(list(itertools.product([-1, 0, 1], repeat=3)), dtype=torch.float64) * 7.0
    shifts = torch.cat([torch.zeros(1, 3, dtype=torch.float64), shifts[(shifts != 0).any(1)]])
    cluster = (inside[None] + shifts[:, None]).reshape(-1, 3)
    G_cluster = sf(numbers.repeat(len(shifts)), cluster, torch.tensor([0, len(cluster)]))[:6]
    torch.testing.assert_close(G_periodic, G_cluster, rtol=1e-11, atol=1e-11)
    p = inside.clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, sf.n_functions, dtype=torch.float64)
    (grad,) = torch.autograd.grad((sf(numbers, p, torch.tensor([0, 6]), small, pbc) * weights).sum(), p)
    torch.testing.assert_close(der.forces(weights.expand(6, -1), 6), -grad, rtol=1e-11, atol=1e-11)


def test_plain_acsf_equals_dscribe():
    dscribe = pytest.importorskip("dscribe.descriptors")
    from ase import Atoms

    species = [1, 6, 9, 17, 35, 53]
    g2 = [[0.5, 1.0], [0.1, 2.0], [1.0, 3.5]]
    eta4, zetas, lambdas = [0.01, 0.2], [1.0, 4.0], [-1.0, 1.0]
    sf = SymmetryFunctions(CUTOFF, [0.0] + [p[0] for p in g2], [0.0] + [p[1] for p in g2], eta4, lambdas,
                           zetas, angular_form="g4", kind="acsf", elements=species)
    oracle = dscribe.ACSF(species=species, r_cut=CUTOFF, g2_params=g2,
                          g4_params=[[e, z, l] for e in eta4 for z in zetas for l in lambdas])
    rng = np.random.default_rng(3)
    for formula in ["CH3FCl", "CH3BrI", "CH3ClCl"]:
        numbers, positions = random_cluster(6, int(rng.integers(1000)))
        atoms = Atoms(formula, positions=positions.numpy())
        ours = sf(torch.tensor(atoms.numbers), positions, torch.tensor([0, 6])).numpy()
        ref = oracle.create(atoms)
        n_el = len(species)
        radial = ours[:, : n_el * 4]
        # ours: pairs (a <= b) in row-major order, then (η, λ, ζ); dscribe: pairs ordered by the
        # larger element, then (η, ζ, λ)
        pairs = list(itertools.combinations_with_replacement(range(n_el), 2))
        angular = ours[:, n_el * 4 :].reshape(6, len(pairs), len(eta4), len(lambdas), len(zetas))
        order = sorted(range(len(pairs)), key=lambda u: (pairs[u][1], pairs[u][0]))
        angular = angular[:, order].transpose(0, 1, 2, 4, 3).reshape(6, -1)
        np.testing.assert_allclose(np.concatenate([radial, angular], 1), ref, rtol=1e-10, atol=1e-10)


def test_standardizer_uses_training_statistics():
    G = torch.tensor([[1.0, 5.0], [3.0, 5.0]], dtype=torch.float64)
    s = Standardizer.fit(G)
    torch.testing.assert_close(s(G), torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_derivatives_grouped_by_centre_give_the_same_forces():
    from lmlp.descriptors import CentreDerivatives

    molecules = [random_cluster(n, seed) for n, seed in [(6, 12), (9, 13), (2, 14)]]
    numbers, positions, offsets = batch(*molecules)
    sf = descriptor()
    G, derivatives = sf.with_derivatives(numbers, positions, offsets)
    dE_dG = torch.randn(4, len(numbers), sf.n_functions, dtype=torch.float64)
    grouped = derivatives.by_centre(len(numbers))
    torch.testing.assert_close(grouped.forces(dE_dG.transpose(0, 1)), derivatives.forces(dE_dG, len(numbers)),
                               rtol=1e-12, atol=1e-12)
    first, rest = grouped.select(torch.arange(6), torch.arange(len(numbers))), grouped.select(
        torch.arange(6, len(numbers)), torch.arange(len(numbers)) - 6)
    joined = CentreDerivatives.cat([first, rest], [0, 6])
    torch.testing.assert_close(joined.forces(dE_dG[0]), derivatives.forces(dE_dG[0], len(numbers)),
                               rtol=1e-12, atol=1e-12)


def test_config_angular_cutoff_defaults_to_6_and_never_exceeds_the_cutoff():
    from lmlp.config import DescriptorConfig

    assert SymmetryFunctions.from_config(DescriptorConfig()).angular_cutoff == 6.0
    assert SymmetryFunctions.from_config(DescriptorConfig(cutoff=5.0)).angular_cutoff == 5.0
    assert SymmetryFunctions.from_config(DescriptorConfig(angular_cutoff=None)).angular_cutoff == 12.0
    with pytest.raises(ValueError, match="angular cutoff 7.0 Å must lie in"):
        descriptor(angular_cutoff=7.0)
