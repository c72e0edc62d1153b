"""Scale-out over processes with ``torch.distributed``, launched by ``torchrun``.

What is spread over the processes ("ranks"):

- ``lmlp train``: the ensemble members. Rank r trains a contiguous share of the M members (its own
  optimizer state for them). The members share the data selection, so once per epoch the ranks
  all-gather the per-structure losses of the fitted structures, and for the metrics the members'
  predictions on the test (and monitored training) structures. There is no per-step gradient
  exchange: a step costs what it costs in one process with M/ranks members, which is why members,
  not structures, are spread. At most M processes.
- ``lmlp compare``: whole (variant, learning-rate) runs, round robin; each run trains all its
  members in one process. Runs are independent, so this scales with the number of runs.

Every rank computes the same selection and metrics from the same gathered numbers, so the run
follows the single-process run: with the same config, 1 and N processes give the same weights to
round-off (per-member arithmetic may use other matrix-kernel blockings). Rank 0 writes the run
directory; checkpoints hold the whole ensemble in the single-process layout, so a run may be
resumed with another number of processes.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything runs in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmlp.errors import LmlpError

TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits for the others at a collective before it gives up (long enough for
process 0 to compute a large on-disk descriptor cache while the others wait). A rank that dies
does not leave the others waiting: torchrun stops them."""


@dataclass(frozen=True)
class Workers:
    """The processes of this run: ``rank`` of ``size`` (``size`` 1: no process group)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and prints."""
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> slice:
        """The contiguous part of ``n`` items (members) of ``rank`` (default: this one); the first
        n mod size ranks get one more."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        start = r * base + min(r, extra)
        return slice(start, start + base + (r < extra))

    def gather_members(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """All ranks' ``local`` tensors (m_r, ...), concatenated along dim 0 in rank order:
        (total, ...), identical on every rank."""
        if self.size == 1:
            return local
        counts = [self._count(total, r) for r in range(self.size)]
        padded = local.new_zeros(max(counts), *local.shape[1:])
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def gather_state(self, local: dict[str, torch.Tensor], member_keys: set[str],
                     total: int) -> dict[str, torch.Tensor]:
        """A state dict with the ``member_keys`` entries gathered over the members; the others
        (equal on every rank) as they are."""
        return {k: self.gather_members(v, total) if k in member_keys else v for k, v in local.items()}

    def local_state(self, full: dict[str, torch.Tensor], member_keys: set[str], total: int) -> dict[str, torch.Tensor]:
        """This rank's members of a whole-ensemble state dict (inverse of ``gather_state``)."""
        part = self.share(total)
        return {k: v[part].clone() if k in member_keys else v for k, v in full.items()}

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer, total: int) -> dict[str, Any]:
        """The optimizer state dict of the whole ensemble: state tensors of a parameter's shape are
        gathered over the members, the rest (steps, hyperparameters) is taken as it is."""
        state = optimizer.state_dict()
        if self.size == 1:
            return state
        shapes = _parameter_shapes(optimizer)
        state["state"] = {
            i: {k: self.gather_members(v, total) if _member_shaped(v, shapes[i]) else v for k, v in s.items()}
            for i, s in state["state"].items()
        }
        return state

    def local_optimizer_state(self, full: dict[str, Any], optimizer: torch.optim.Optimizer,
                              total: int) -> dict[str, Any]:
        """This rank's part of a whole-ensemble optimizer state dict, for ``optimizer`` (over this
        rank's members)."""
        if self.size == 1:
            return full
        shapes = _parameter_shapes(optimizer)
        part = self.share(total)
        whole = {i: torch.Size([total, *shape[1:]]) for i, shape in shapes.items()}
        return {**full, "state": {
            i: {k: v[part].clone() if _member_shaped(v, whole[i]) else v for k, v in s.items()}
            for i, s in full["state"].items()
        }}

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _count(self, total: int, rank: int) -> int:
        part = self.share(total, rank)
        return part.stop - part.start


SINGLE = Workers()
"""One process, no process group."""


def _parameter_shapes(optimizer: torch.optim.Optimizer) -> dict[int, torch.Size]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: p.shape for i, p in enumerate(params)}


def _member_shaped(value: Any, shape: torch.Size) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == shape


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialise(device: str = "cpu") -> Workers:
    """Join the process group torchrun describes (gloo on CPUs, NCCL for CUDA); ``SINGLE``
    without torchrun. Idempotent."""
    if not launched():
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise LmlpError(f"cannot join the torchrun process group ({backend}): {str(exc).splitlines()[0]}") from None
    return current()


def current() -> Workers:
    """The workers of the initialised process group, else ``SINGLE``."""
    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size())
    return SINGLE


@contextlib.contextmanager
def processes(device: str = "cpu") -> Iterator[Workers]:
    """The workers of a command: joins torchrun's process group for its duration (``SINGLE``
    without torchrun)."""
    workers = initialise(device)
    try:
        yield workers
    finally:
        if workers.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(name: str, workers: Workers = SINGLE) -> torch.device:
    """The torch device of ``training.device``: "cpu", "cuda" (one GPU per rank, by LOCAL_RANK) or
    "auto" (CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LmlpError("training.device: cuda was asked for, but torch sees no CUDA device "
                        "(use cpu or auto)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", workers.rank)) % torch.cuda.device_count())
