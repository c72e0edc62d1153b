"""NPT with an lMLP on a periodic solid: fcc copper trained on ASE's EMT, against EMT itself.

Run (about 10 minutes on 2 cores): ``.venv/bin/python examples/npt_copper.py [--out examples/results/npt-copper]``

1. Data: ``--structures`` 32-atom fcc Cu cells (2×2×2 conventional), each with a random lattice
   constant within ±5 % of 3.61 Å, a random symmetric shear of up to ±2 % per strain component
   and every atom displaced by a Gaussian of rms length 0.01–0.1 Å; labelled with ASE's EMT,
   split 80/10/10 at random (seeded), written to ``runs/npt-copper-data/cu_emt.h5``.
2. Training: ``lmlp train examples/npt_copper.yaml`` (4 members, 26 eeACSFs, 5.5 Å cutoff).
3. Equation of state: energy per atom of the perfect crystal at 15 lattice constants (±4 %),
   fitted with ASE's ``EquationOfState`` (Birch–Murnaghan): equilibrium lattice constant a0 (Å)
   and bulk modulus B (GPa), lMLP against EMT; and the lMLP stress against the EMT stress at
   ±2 % strain.
4. NPT: a 3×3×3 conventional cell (108 atoms) at 300 K and 0 and 10 kbar with the isotropic MTK
   barostat of ``lmlp md`` (``lmlp.md.make_dynamics``, 2 fs steps, ``--steps``), lMLP and EMT
   from the same start and seed: mean volume per atom (Å³) over the second half, and the
   conserved-quantity drift.

Output (``--out``): ``npt.json`` (all numbers) and ``npt.png`` (volume per atom against time,
E(V) curves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402
from ase.eos import EquationOfState  # noqa: E402
from ase.md.velocitydistribution import Stationary  # noqa: E402

from lmlp.calculator import LMLPCalculator  # noqa: E402
from lmlp.data import StructureSet, split_indices, write_structures  # noqa: E402
from lmlp.md import make_dynamics, thermalize_momenta  # noqa: E402

A0 = 3.61
"""Start lattice constant of fcc Cu, Å."""
CONFIG = Path("examples/npt_copper.yaml")
DATA = Path("runs/npt-copper-data/cu_emt.h5")
MODEL = Path("runs/npt-copper/model.pt")
TIMESTEP_FS = 2.0
GPA_PER_EV_A3 = 1.0 / units.GPa


def make_data(n: int, seed: int) -> StructureSet:
    """``n`` strained, sheared and displaced 32-atom Cu cells labelled with EMT (module docstring)."""
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=A0, cubic=True).repeat(2)
    images = []
    for _ in range(n):
        shear = rng.uniform(-0.02, 0.02, (3, 3))
        strain = (1.0 + rng.uniform(-0.05, 0.05)) * np.eye(3) + (shear + shear.T) / 2
        atoms = base.copy()
        atoms.set_cell(base.cell.array @ strain, scale_atoms=True)
        sigma = rng.uniform(0.01, 0.1) / np.sqrt(3.0)
        atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_forces()
        atoms.info.update(charge=0, label="Cu")
        images.append(atoms)
    s = StructureSet.from_atoms(images)
    s.split = split_indices(s.label, (0.8, 0.1, 0.1), seed)
    s.attrs = {"method": "EMT", "program": "ase", "program_version": __import__("ase").__version__,
               "sampling": f"examples/npt_copper.py: {n} strained/sheared/displaced fcc Cu cells, seed {seed}"}
    return s


def equation_of_state(calc) -> dict[str, float | list[float]]:
    """a0 (Å), B (GPa) and the E(V) points (Å³/atom, eV/atom) of perfect fcc Cu with ``calc``."""
    volumes, energies = [], []
    for a in np.linspace(0.96, 1.04, 15) * A0:
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(2)
        atoms.calc = calc
        volumes.append(atoms.get_volume() / len(atoms))
        energies.append(atoms.get_potential_energy() / len(atoms))
    v0, _, b = EquationOfState(volumes, energies).fit()
    return {"a0": float((4 * v0) ** (1 / 3)), "B_GPa": float(b * GPA_PER_EV_A3),
            "volumes": volumes, "energies": energies}


def strained_stress(calc, strain: float) -> list[float]:
    """Voigt stress (GPa) of perfect Cu (32 atoms) at isotropic ``strain`` of the 3.61 Å cell."""
    atoms = bulk("Cu", "fcc", a=A0 * (1 + strain), cubic=True).repeat(2)
    atoms.rattle(0.02, seed=1)
    atoms.calc = calc
    return (atoms.get_stress() * GPA_PER_EV_A3).tolist()


def npt(calc, pressure_bar: float, steps: int, seed: int) -> dict[str, float | list[float]]:
    """MTK NPT of 108-atom Cu at 300 K and ``pressure_bar``: volumes per atom (Å³) every 10 steps."""
    atoms = bulk("Cu", "fcc", a=A0, cubic=True).repeat(3)
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature_K=300.0, rng=rng)
    Stationary(atoms)
    dyn = make_dynamics(atoms, "npt", TIMESTEP_FS, 300.0, 0.0, rng, pressure_bar)
    volumes, conserved = [], []

    def record() -> None:
        volumes.append(atoms.get_volume() / len(atoms))
        conserved.append(float(dyn.get_conserved_energy()))

    dyn.attach(record, interval=10)
    dyn.run(steps)
    half = volumes[len(volumes) // 2:]
    return {"mean_volume": float(np.mean(half)), "std_volume": float(np.std(half)),
            "conserved_drift_eV_per_atom": (conserved[-1] - conserved[0]) / len(atoms), "volumes": volumes}


def plot(results: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("lmlp", "-"), ("emt", "--")):
        for p, runs in results["npt"][name].items():
            t = np.arange(len(runs["volumes"])) * 10 * TIMESTEP_FS / 1000
            left.plot(t, runs["volumes"], style, label=f"{name} {p} bar")
        eos = results["eos"][name]
        right.plot(eos["volumes"], eos["energies"], style + "o", ms=3, label=name)
    left.set(xlabel="time / ps", ylabel="volume / Å³ per atom", title="NPT, 108 Cu atoms, 300 K")
    right.set(xlabel="volume / Å³ per atom", ylabel="energy / eV per atom", title="E(V), perfect fcc")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=300)
    parser.add_argument("--steps", type=int, default=4000, help="NPT steps (2 fs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("examples/results/npt-copper"))
    args = parser.parse_args()

    DATA.parent.mkdir(parents=True, exist_ok=True)
    write_structures(DATA, make_data(args.structures, args.seed))
    subprocess.run([sys.executable, "-m", "lmlp", "train", str(CONFIG)], check=True)
    lmlp = LMLPCalculator(MODEL)
    results: dict = {"eos": {}, "stress_GPa": {}, "npt": {"lmlp": {}, "emt": {}}, "options": vars(args) | {"out": str(args.out)}}
    for name, calc in (("lmlp", lmlp), ("emt", EMT())):
        results["eos"][name] = equation_of_state(calc)
        results["stress_GPa"][name] = {s: strained_stress(calc, s) for s in (-0.02, 0.02)}
        for p in (0.0, 10000.0):
            results["npt"][name][p] = npt(calc, p, args.steps, args.seed)
    run = json.loads((MODEL.parent / "metrics.json").read_text()) if (MODEL.parent / "metrics.json").exists() else {}
    results["training_metrics"] = run
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "npt.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "npt.png")
    for name in ("lmlp", "emt"):
        eos = results["eos"][name]
        line = ", ".join(f"{p:g} bar: {r['mean_volume']:.3f} ± {r['std_volume']:.3f} Å³/atom "
                         f"(drift {r['conserved_drift_eV_per_atom'] * 1000:+.2f} meV/atom)"
                         for p, r in results["npt"][name].items())
        print(f"{name:5s} a0 {eos['a0']:.4f} Å, B {eos['B_GPa']:.1f} GPa; NPT 300 K {line}")
    for s in (-0.02, 0.02):
        print(f"stress at {s:+.0%} strain (GPa, xx yy zz): lmlp "
              f"{' '.join(f'{v:.3f}' for v in results['stress_GPa']['lmlp'][s][:3])}, emt "
              f"{' '.join(f'{v:.3f}' for v in results['stress_GPa']['emt'][s][:3])}")


if __name__ == "__main__":
    main()
