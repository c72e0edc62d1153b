#!/usr/bin/env bash
# The active-learning loop on the SN2 data, end to end:
#   MD with the lMLP → structures with a high ensemble uncertainty are flagged → they are labelled
#   with GFN2-xTB → they join the training data → the model continues training on the grown set.
# Needs a trained model (lmlp train configs/sn2.yaml → runs/sn2/model.pt) and the reference extra
# (tblite; `make test` installs it). Run from the repository root: bash examples/active_learning.sh
set -euo pipefail
LMLP=${LMLP:-.venv/bin/lmlp}
MODEL=${MODEL:-runs/sn2/model.pt}
WORK=${WORK:-runs/active-learning}
mkdir -p "$WORK"

# 1. A start structure: one F⁻ + CH3Cl structure of the shipped data, as extxyz.
.venv/bin/python - "$WORK/start.extxyz" <<'PY'
import sys
import numpy as np
from lmlp.data import read_structures, write_extxyz
s, _ = read_structures("data/sn2_gfn2xtb.h5")
write_extxyz(sys.argv[1], s.subset(np.flatnonzero(s.label == "F+CH3Cl")[:1]))
PY

# 2. Hot NVT MD (1000 K) explores beyond the training data; uncertain structures are flagged.
"$LMLP" md "$MODEL" "$WORK/start.extxyz" --ensemble nvt --temperature 1000 --timestep 0.5 --steps 4000 \
    --out "$WORK/md.traj" --flagged "$WORK/flagged.extxyz" --max-flagged 20 --flag-interval 50 \
    --energy-factor 1.5 --force-factor 3 --no-progress

if [ ! -s "$WORK/flagged.extxyz" ]; then
    echo "no structure exceeded the uncertainty thresholds: nothing to learn"; exit 0
fi

# 3. Label the flagged structures with the reference method of the training data.
"$LMLP" data label "$WORK/flagged.extxyz" --method gfn2-xtb --charge -1 --test-fraction 0.2 \
    --out "$WORK/flagged.h5"

# 4. The training data grow by the new structures.
"$LMLP" data merge "$WORK/grown.h5" data/sn2_gfn2xtb.h5 "$WORK/flagged.h5"

# 5. Continue training on the grown set (new structures enter the selection with high weight).
cat > "$WORK/continue.yaml" <<YAML
name: active-learning
optimizer: {name: core, lr: 1.0e-2, params: {p_frozen: 0.1}}
training: {epochs: 200, train_metrics_sample: 1000}
data: {path: $WORK/grown.h5}
output: {run_dir: $WORK/run}
YAML
"$LMLP" train "$WORK/continue.yaml" --continue-from "$MODEL"
