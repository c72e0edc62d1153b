#!/usr/bin/env bash
# Set up benchmarks/peers/.venv: a venv of its own for the MACE peer benchmark.
#
# Order matters: torch==2.13.0 goes in FIRST (pip takes the CPU wheel of 2.13.0 that lies on
# this machine's disk); every later install runs under a constraint file pinning torch==2.13.0,
# so nothing can pull a newer (multi-GB CUDA) torch. mace-torch 0.3.16 asks for torch>=1.12,
# which the installed 2.13.0 satisfies. lmlp itself goes in editable and WITHOUT its
# dependencies (its pins are for its own venv); the few it needs to read the HDF5 data
# (numpy, h5py, ase) and the rest of its list come in by name.
#
# Usage (from anywhere): bash benchmarks/peers/setup.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
py="$venv/bin/python"

if [[ ! -x "$py" ]]; then
    python3 -m venv "$venv"
fi

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"

pip_install() { "$py" -m pip install --disable-pip-version-check -c "$constraints" "$@"; }

# 1. torch first, pinned: the CPU wheel on local disk.
pip_install "torch==2.13.0"

# 2. MACE and h5py. Refuse to go on if pip would touch torch.
if "$py" -m pip install --dry-run -c "$constraints" "mace-torch==0.3.16" h5py 2>&1 \
        | grep -E "^Would install.* torch-[0-9]"; then
    echo "setup.sh: pip would replace torch 2.13.0; stopping" >&2
    exit 1
fi
pip_install "mace-torch==0.3.16" h5py

# 3. lmlp (for lmlp.data.read_structures), editable, no dependencies; then those of its
#    dependencies that mace-torch did not already bring (pip skips the satisfied ones).
pip_install --no-deps -e "$repo"
pip_install "ase>=3.23" "numpy>=1.26" "h5py>=3.10" "typer>=0.12" "pyyaml>=6.0" \
    "matplotlib>=3.8" "tqdm>=4.66"

# 4. Check: torch is still 2.13.0 (CPU), MACE imports, lmlp reads its data.
"$py" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import mace
from mace.calculators import MACECalculator  # noqa: F401
from lmlp.data import read_structures  # noqa: F401
from importlib.metadata import version
print(f"peers venv ok: torch {torch.__version__}, mace-torch {version('mace-torch')}, "
      f"lmlp {version('lmlp')}, ase {version('ase')}, h5py {version('h5py')}")
PY
