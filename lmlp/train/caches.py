"""The descriptor caches of a run's splits (``training.descriptor_cache``: memory or disk) and
the fixed sample of training structures behind the per-epoch training metrics."""

from __future__ import annotations

import torch

from lmlp.batch import Batch, compute_batch
from lmlp.cache import DiskCache, MemoryCache
from lmlp.config import Config
from lmlp.data import StructureSet
from lmlp.descriptors import SymmetryFunctions
from lmlp.distributed import Workers

Cache = MemoryCache | DiskCache


def build_caches(cfg: Config, sets: dict[str, StructureSet], descriptor: SymmetryFunctions, dtype: torch.dtype,
                 workers: Workers, device: torch.device) -> list[Cache]:
    """The descriptor caches of ``sets`` (split name: structures), in that order; on disk, process 0
    computes the files (or finds them from an earlier start) and the others wait."""
    if cfg.training.descriptor_cache == "memory":
        return [MemoryCache(compute_batch(s, descriptor, dtype), device) for s in sets.values()]

    def disk() -> list[Cache]:
        return [DiskCache.open(cfg.run_dir / f"descriptors_{split}.h5", s, descriptor, dtype, device=device)
                for split, s in sets.items()]

    if workers.main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        caches = disk()
    workers.barrier()
    if not workers.main:
        caches = disk()
    return caches


def close_caches(caches: list[Cache]) -> None:
    """Close the files of the disk caches among ``caches``."""
    for cache in caches:
        if isinstance(cache, DiskCache):
            cache.close()


def monitor_cache(cfg: Config, train: Cache) -> Cache:
    """The training structures of the per-epoch metrics: all, or a fixed random sample
    (``training.train_metrics_sample``, drawn with ``training.seed`` + 1) in memory."""
    n, size = len(train), cfg.training.train_metrics_sample
    if size is None or size >= n:
        return train
    generator = torch.Generator().manual_seed(cfg.training.seed + 1)
    sample = torch.sort(torch.randperm(n, generator=generator)[:size]).values
    return MemoryCache(Batch.cat(list(train.select(sample))))


def monitored_text(monitor: Cache, train: Cache) -> str:
    """What the per-epoch training metrics cover, for the learning-curve header."""
    n, total = len(monitor), len(train)
    return f"all {total} training structures" if n == total else f"a fixed random sample of {n} of {total} training structures"
