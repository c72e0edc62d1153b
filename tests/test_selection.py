import torch

from lmlp.config import SelectionConfig
from lmlp.selection import DataSelection


def test_selects_fit_fraction_of_distinct_structures():
    sel = DataSelection(SelectionConfig(fit_fraction=0.1), 95, seed=0)
    chosen = sel.select()
    assert len(chosen) == 10 == len(set(chosen.tolist()))
    assert chosen.min() >= 0 and chosen.max() < 95


def test_weights_rise_for_high_loss_fall_for_low_loss_and_stay_in_bounds():
    cfg = SelectionConfig(p_min=0.5, p_max=4.0, p_init=1.0, raise_factor=2.0, lower_factor=0.5)
    sel = DataSelection(cfg, 4, seed=0)
    idx = torch.tensor([0, 1, 2])
    for _ in range(5):
        sel.update(idx, torch.tensor([3.0, 0.1, 1.0]), reference=1.0)
    assert sel.weights.tolist() == [4.0, 0.5, 0.5, 1.0]
    assert (sel.weights > 0).all()


def test_adaptive_selection_prefers_heavy_structures():
    sel = DataSelection(SelectionConfig(fit_fraction=0.1), 100, seed=1)
    sel.weights[:10] = 10.0
    sel.weights[10:] = 0.1
    counts = torch.zeros(100)
    for _ in range(200):
        counts[sel.select()] += 1
    assert counts[:10].mean() > 10 * counts[10:].mean()


def test_random_mode_is_uniform():
    sel = DataSelection(SelectionConfig(mode="random", fit_fraction=0.5), 10, seed=2)
    sel.weights[:5] = 10.0
    counts = torch.zeros(10)
    for _ in range(2000):
        counts[sel.select()] += 1
    assert (counts / 2000 - 0.5).abs().max() < 0.05


def test_new_structures_enter_high_and_outliers_are_reported():
    cfg = SelectionConfig(p_max=2.0, p_new=2.0, outlier_epochs=3, outlier_factor=10.0, raise_factor=2.0)
    sel = DataSelection(cfg, 3, seed=0)
    sel.add(2)
    assert sel.weights.tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]
    idx = torch.tensor([1, 3, 4])
    losses = [[50.0, 5.0, 50.0], [50.0, 50.0, 5.0], [50.0, 50.0, 50.0], [50.0, 50.0, 50.0], [50.0, 50.0, 50.0]]
    reported = [sel.update(idx, torch.tensor(row), reference=1.0).tolist() for row in losses]
    # three extreme losses in a row that do not fall, reported once; an ordinary loss restarts the count
    assert reported == [[], [], [1], [3], [4]]


def test_a_new_structure_being_learnt_is_no_outlier():
    """A new structure (p_new, fitted every epoch) starts far above the training loss level: its
    extreme loss falls while it is learnt, which is not the mark of bad reference data."""
    cfg = SelectionConfig(p_new=10.0, outlier_epochs=3, outlier_factor=10.0)
    sel = DataSelection(cfg, 2, seed=0)
    sel.add(1)
    idx = torch.tensor([0, 2])
    learnt = [400.0, 200.0, 100.0, 60.0, 40.0, 20.0, 12.0, 5.0]
    reported = [sel.update(idx, torch.tensor([1.0, loss]), reference=1.0).tolist() for loss in learnt]
    assert reported == [[]] * len(learnt)


def test_an_extreme_loss_that_stops_falling_is_reported():
    cfg = SelectionConfig(outlier_epochs=3, outlier_factor=10.0)
    sel = DataSelection(cfg, 1, seed=0)
    idx = torch.tensor([0])
    # falls over fits 1-3 (count restarts at fit 3), then stays: fits 3-5 do not fall
    losses = [400.0, 300.0, 200.0, 250.0, 200.0, 210.0, 220.0]
    reported = [sel.update(idx, torch.tensor([loss]), reference=1.0).tolist() for loss in losses]
    assert reported == [[], [], [], [], [0], [], []]


def test_state_round_trip_continues_the_same_stream():
    sel = DataSelection(SelectionConfig(), 50, seed=3)
    sel.update(sel.select(), torch.rand(5, generator=torch.Generator().manual_seed(0)), 0.5)
    state = sel.state_dict()
    expected = [sel.select() for _ in range(3)]
    other = DataSelection(SelectionConfig(), 50, seed=99)
    other.load_state_dict(state)
    for want in expected:
        torch.testing.assert_close(other.select(), want)
    torch.testing.assert_close(other.weights, sel.weights)


def test_carry_over_keeps_known_structures_and_enters_new_ones_high():
    cfg = SelectionConfig(p_init=1.0, p_new=10.0)
    earlier = DataSelection(cfg, 3, seed=5)
    earlier.update(torch.tensor([0, 2]), torch.tensor([9.0, 0.0]), reference=1.0)
    earlier.select()
    later = DataSelection(cfg, 4, seed=0)
    later.carry_over(earlier.state_dict(), torch.tensor([2, -1, 0, -1]))
    assert later.weights.tolist() == [earlier.weights[2].item(), 10.0, earlier.weights[0].item(), 10.0]
    assert torch.equal(later.generator.get_state(), earlier.generator.get_state())


def test_a_state_of_earlier_lmlp_without_streak_starts_loads():
    sel = DataSelection(SelectionConfig(outlier_epochs=2, outlier_factor=10.0), 3, seed=0)
    sel.update(torch.tensor([0, 1]), torch.tensor([50.0, 1.0]), reference=1.0)
    state = sel.state_dict()
    del state["streak_start"]
    other = DataSelection(SelectionConfig(outlier_epochs=2, outlier_factor=10.0), 3, seed=0)
    other.load_state_dict(state)
    assert other.update(torch.tensor([0]), torch.tensor([20.0]), reference=1.0).tolist() == [0]
