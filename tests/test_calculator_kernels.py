import pytest
import torch

import lmlp.calculator_kernels as kernels
from lmlp.calculator_kernels import CHUNK_WIDTH_MAX, chunk_layout, contract_slots, pair_virials, radial_bands


def gathered(slot_gradients: torch.Tensor, slot: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_c S[slot_b, m, c] V[b, x, c] written out."""
    return torch.einsum("bmc,bxc->bmx", slot_gradients[slot], values)


@pytest.mark.parametrize("per_slot", [1, 5, 30, 300])
@pytest.mark.parametrize("n_out", [1, 3, 4])
def test_chunked_contraction_equals_the_gathered_one(per_slot, n_out):
    generator = torch.Generator().manual_seed(per_slot)
    n_slots, members, terms = 40, 3, 7
    # uneven slots in random order, a third of them empty
    slot = torch.randint(0, n_slots, (per_slot * n_slots,), generator=generator) % (2 * n_slots // 3)
    slot = torch.cat([slot, torch.full((per_slot,), n_slots - 1)])
    S = torch.randn(n_slots, members, terms, generator=generator, dtype=torch.float64)
    V = torch.randn(len(slot), n_out, terms, generator=generator, dtype=torch.float64)
    layout = chunk_layout(slot)
    if per_slot == 1:
        assert layout is None  # a chunk of one row is a gather
    else:
        index, source, chunk_slot, width = layout
        assert 1 < width <= CHUNK_WIDTH_MAX and len(torch.unique(index)) == len(slot)
        assert len(source) == len(chunk_slot) * width and torch.equal(source[index], torch.arange(len(slot)))
        assert torch.equal(chunk_slot[torch.div(index, width, rounding_mode="floor")], slot)
    expected = gathered(S, slot, V)
    torch.testing.assert_close(contract_slots(S, slot, V, layout), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(contract_slots(S, slot, V, None), expected, rtol=0, atol=1e-12)


def test_no_pairs_have_no_layout():
    assert chunk_layout(torch.zeros(0, dtype=torch.int64)) is None


def test_pair_virials_are_the_outer_products_summed():
    generator = torch.Generator().manual_seed(0)
    gradient = torch.randn(50, 4, 3, generator=generator)
    vectors = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    expected = torch.einsum("pma,pb->mab", gradient.double(), vectors)
    torch.testing.assert_close(pair_virials(gradient, vectors), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("overhead", "expected"), [(0, [2, 10, 12, 18]), (10**9, [2]), (1 << 15, [2, 10, 18])])
def test_radial_bands_minimise_terms_plus_a_cost_per_band(monkeypatch, overhead, expected):
    """Pairs whose first needed term is 2, 10, 12 or 18 of 24: one band per distinct start when bands
    are free, one band when they are dear, and in between the split that saves the most."""
    monkeypatch.setattr(kernels, "BAND_OVERHEAD", overhead)
    first = torch.cat([torch.full((n,), k) for k, n in ((2, 5_000), (10, 30_000), (12, 2_000), (18, 40_000))])
    shuffled = first[torch.randperm(len(first), generator=torch.Generator().manual_seed(0))]
    band, starts = radial_bands(shuffled, 24)
    assert starts == expected
    start = torch.tensor(starts)[band]
    assert bool((start <= shuffled).all())  # no pair skips a term it needs
    assert [int(shuffled[band == b].min()) for b in range(len(starts))] == starts  # no band starts early
