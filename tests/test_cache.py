"""Descriptor caches: the disk cache hands out what the memory cache does, and trains alike."""

import os

import pytest
import torch
from factories import TINY

from lmlp.batch import Batch, compute_batch
from lmlp.cache import DiskCache, MemoryCache
from lmlp.config import DescriptorConfig, config_from_dict
from lmlp.data import read_structures
from lmlp.descriptors import SymmetryFunctions
from lmlp.errors import LmlpError
from lmlp.integrity import load_checked
from lmlp.train import train


@pytest.fixture(scope="module")
def structures():
    s, _ = read_structures(TINY)
    return s.split_subset("train")


@pytest.fixture(scope="module")
def descriptor():
    return SymmetryFunctions.from_config(DescriptorConfig(cutoff=6.0))


@pytest.fixture
def caches(tmp_path, structures, descriptor, monkeypatch):
    import lmlp.cache

    monkeypatch.setattr(lmlp.cache, "STRUCTURES_PER_CHUNK", 35)  # several blocks in the tiny set
    disk = DiskCache.open(tmp_path / "d.h5", structures, descriptor, torch.float64, log=lambda _: None)
    yield MemoryCache(compute_batch(structures, descriptor, torch.float64)), disk
    disk.close()


def forces_of(batch: Batch, seed: int = 0) -> torch.Tensor:
    """Forces of a fixed random dE/dG through the batch's derivatives (compares dG/dR whatever the padding)."""
    dE_dG = torch.randn(len(batch.numbers), batch.G.shape[1], generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    return batch.derivatives.forces(dE_dG)


def test_disk_selection_equals_memory_selection(caches):
    memory, disk = caches
    indices = torch.tensor([0, 3, 34, 35, 36, 100, 130, len(memory) - 1])
    expected = next(memory.select(indices))
    pieces = list(disk.select(indices))
    assert len(pieces) == 5  # blocks 0, 1, 2, 3 and the last
    got = Batch.cat(pieces)
    for name in ("numbers", "offsets", "G", "energy", "forces"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0, msg=name)
    torch.testing.assert_close(forces_of(got), forces_of(expected), rtol=0, atol=1e-12)


def test_iterating_the_disk_cache_covers_every_structure_once(caches):
    memory, disk = caches
    got, expected = Batch.cat(list(disk)), Batch.cat(list(memory))
    torch.testing.assert_close(got.G, expected.G, rtol=0, atol=0)
    torch.testing.assert_close(forces_of(got), forces_of(expected), rtol=0, atol=1e-12)


def test_disk_standardizer_equals_the_in_memory_fit(caches):
    memory, disk = caches
    a, b = memory.standardizer(), disk.standardizer()
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.std, a.std, rtol=1e-10, atol=1e-14)


def test_a_matching_cache_is_reused_and_a_stale_one_rebuilt(tmp_path, structures, descriptor):
    path = tmp_path / "d.h5"
    messages = []
    DiskCache.open(path, structures, descriptor, torch.float32, log=messages.append).close()
    stamp = os.stat(path).st_mtime_ns
    DiskCache.open(path, structures, descriptor, torch.float32, log=messages.append).close()
    assert os.stat(path).st_mtime_ns == stamp and len(messages) == 1
    other = SymmetryFunctions.from_config(DescriptorConfig(cutoff=5.0))
    DiskCache.open(path, structures, other, torch.float32, log=messages.append).close()
    assert len(messages) == 2


def test_a_corrupted_cache_is_reported_in_one_line(tmp_path, structures, descriptor):
    path = tmp_path / "d.h5"
    DiskCache.open(path, structures, descriptor, torch.float32, log=lambda _: None).close()
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 4, len(data) * 3 // 4, len(data) // 50):
        data[offset] ^= 0x55
    path.write_bytes(bytes(data))
    cache = DiskCache(path, structures, torch.float32)
    with pytest.raises(LmlpError, match=r"^[^\n]*d\.h5: descriptor cache unreadable [^\n]*rebuild it$"):
        list(cache)
    cache.close()


def config(run_dir, cache):
    return config_from_dict({
        "name": "cache", "data": {"path": str(TINY)}, "ensemble": {"members": 2}, "model": {"hidden": [8, 8]},
        "selection": {"fit_fraction": 0.5},
        "training": {"epochs": 8, "dtype": "float64", "descriptor_cache": cache, "train_metrics_sample": 50},
        "optimizer": {"name": "core", "lr": 0.01},
        "output": {"run_dir": str(run_dir), "progress": False, "plots": False},
    })


def test_training_from_the_disk_cache_equals_training_in_memory(tmp_path, monkeypatch):
    import lmlp.cache

    monkeypatch.setattr(lmlp.cache, "STRUCTURES_PER_CHUNK", 30)  # gradients accumulate over 7 blocks
    memory = train(config(tmp_path / "memory", "memory"))
    disk = train(config(tmp_path / "disk", "disk"))
    assert {p.name for p in disk.run_dir.glob("descriptors_*.h5")} == {
        "descriptors_train.h5", "descriptors_validation.h5", "descriptors_test.h5"}
    a = load_checked(memory.run_dir / "model.pt", "model")["state_dict"]
    b = load_checked(disk.run_dir / "model.pt", "model")["state_dict"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-9, msg=key)
    assert disk.best_epoch.tolist() == memory.best_epoch.tolist()
    assert disk.test.ensemble == pytest.approx(memory.test.ensemble, rel=1e-9)


def test_a_cache_written_with_another_block_size_is_rebuilt(tmp_path, structures, descriptor, monkeypatch):
    import lmlp.cache

    path, messages = tmp_path / "d.h5", []
    monkeypatch.setattr(lmlp.cache, "STRUCTURES_PER_CHUNK", 35)
    DiskCache.open(path, structures, descriptor, torch.float64, log=messages.append).close()
    monkeypatch.setattr(lmlp.cache, "STRUCTURES_PER_CHUNK", 50)
    disk = DiskCache.open(path, structures, descriptor, torch.float64, log=messages.append)
    assert len(messages) == 2
    expected = Batch.cat(list(MemoryCache(compute_batch(structures, descriptor, torch.float64))))
    # other blocks sum the moments in another order (round-off); a stale cache's shifted rows differ by O(1)
    torch.testing.assert_close(Batch.cat(list(disk)).G, expected.G, rtol=0, atol=1e-12)
    disk.close()
