"""Training epoch time: lmlp (cached dG/dR, stacked members) against the straightforward way.

The straightforward way trains the members one after another and recomputes the descriptors with
autograd through the positions in every step (forces from create_graph double backward).
Both take one optimizer step on the same 10 % of the training structures. The lmlp epoch also
evaluates every member and the ensemble on the test set and on the full protocol's 1000-structure
training sample (``training.train_metrics_sample``); the straightforward one does not. The time of
metrics over all training structures is printed as well.

Run: ``.venv/bin/python benchmarks/training.py [--members 10] [--epochs 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lmlp.config import config_from_dict
from lmlp.data import read_structures
from lmlp.descriptors import Standardizer, SymmetryFunctions
from lmlp.optim import build_optimizer
from lmlp.selection import DataSelection
from lmlp.batch import chunks, compute_batch, predict
from lmlp.metrics import evaluate, member_losses
from lmlp.train import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/sn2_gfn2xtb.h5")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({"ensemble": {"members": args.members}, "data": {"path": args.data}})
    data, _ = read_structures(args.data)
    train_set, test_set = data.split_subset("train"), data.split_subset("test")
    descriptor = SymmetryFunctions.from_config(cfg.descriptor)
    start = time.perf_counter()
    train_batch = compute_batch(train_set, descriptor, torch.float32)
    test_pieces, train_pieces = chunks(compute_batch(test_set, descriptor, torch.float32)), chunks(train_batch)
    cache_time = time.perf_counter() - start
    sample = torch.sort(torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1))[:1000]).values
    sample_pieces = chunks(train_batch.select(sample))
    model = build_model(cfg, train_set, Standardizer.fit(train_batch.G.double()), descriptor).float()
    groups = [{"params": list(network.parameters()), "member_dim": 0} for network in model.networks]
    optimizer = build_optimizer("core", groups, 1e-2)
    selection = DataSelection(cfg.selection, len(train_set), 0)
    q = cfg.training.energy_weight

    def lmlp_epoch() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        batch = train_batch.select(selection.select())
        optimizer.zero_grad()
        energies, forces = predict(model, batch)
        member_losses(energies, forces, batch, q, 1.0)[0].sum().backward()
        optimizer.step()
        t1 = time.perf_counter()
        evaluate(model, sample_pieces, q, 1.0), evaluate(model, test_pieces, q, 1.0)
        t2 = time.perf_counter()
        evaluate(model, train_pieces, q, 1.0)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    single = config_from_dict({"ensemble": {"members": 1}, "data": {"path": args.data}})
    singles = [build_model(single, train_set, Standardizer.fit(train_batch.G.double()), descriptor).float() for _ in range(args.members)]
    single_optimizers = [build_optimizer("core", list(m.parameters()), 1e-2) for m in singles]

    def naive_epoch() -> float:
        t0 = time.perf_counter()
        subset = train_set.subset(selection.select().numpy())
        numbers, offsets = torch.from_numpy(subset.numbers), torch.from_numpy(subset.offsets)
        ref_e, ref_f = torch.from_numpy(subset.energy), torch.from_numpy(subset.forces).float()
        n = offsets[1:] - offsets[:-1]
        for member, opt in zip(singles, single_optimizers):
            positions = torch.from_numpy(subset.positions).float().requires_grad_(True)
            G = descriptor(numbers, positions, offsets)
            energy = member.energies(member.atomic_energies(G, numbers), numbers, offsets)[0]
            (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
            loss = q**2 * (((energy - ref_e) / n) ** 2).mean() + ((-grad - ref_f) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    lmlp_epoch(), naive_epoch()  # warm-up
    ours = [lmlp_epoch() for _ in range(args.epochs)]
    naive = [naive_epoch() for _ in range(args.epochs)]
    step, metrics, full = (float(np.median([o[k] for o in ours])) for k in range(3))
    print(f"{len(train_set)} training / {len(test_set)} test structures, {args.members} members, "
          f"fit fraction {cfg.selection.fit_fraction}, {args.threads} threads, float32")
    print(f"  descriptor + dG/dR cache (once):            {cache_time:7.2f} s")
    print(f"  lmlp step (stacked members, cached dG/dR):  {step:7.3f} s")
    print(f"  lmlp metrics (all members, test + 1000-structure train sample): {metrics:7.3f} s")
    print(f"  lmlp metrics over all {len(train_set)} training structures:       {full:7.3f} s")
    print(f"  straightforward step (members in turn, autograd through G): {np.median(naive):7.3f} s")
    print(f"  step speed-up: {np.median(naive) / step:.1f}x;  full-protocol estimate (2000 epochs): "
          f"{2000 * (step + metrics) / 60:.1f} min")


if __name__ == "__main__":
    main()
