#!/usr/bin/env bash
# The networks against the course's LSTM at its size (2x200, BPTT 10 x 20 streams, SGD lr 1, dropout 0.2):
# each for the same number of steps, then each for the same wall time (a time budget), one run at a time.
# The PTB files are read from $CHARLM_DATA_DIR.
#
#   bash bench/networks.sh [steps, default 3000] [budget DD:HH:MM:SS, default 00:00:01:30]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-outputs/networks}
STEPS=${1:-3000}
BUDGET=${2:-00:00:01:30}
COMMON=(test=false trainer.enable_progress_bar=false trainer.enable_model_summary=false trainer.log_every_n_steps=100)
for net in lstm gru mogrifier; do
  "$PY" train.py model=$net "${COMMON[@]}" trainer.max_epochs=1 "trainer.limit_train_batches=$STEPS" \
    "hydra.run.dir=$OUT/steps/$net" > "$OUT.steps.$net.log" 2>&1 || echo "$net, same steps: failed ($OUT.steps.$net.log)"
  "$PY" train.py model=$net "${COMMON[@]}" trainer.max_epochs=10 "trainer.max_time=$BUDGET" \
    "hydra.run.dir=$OUT/time/$net" > "$OUT.time.$net.log" 2>&1 || echo "$net, same time: failed ($OUT.time.$net.log)"
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
print("| network | parameters | chars/s (train) | vs LSTM | same steps: valid bpc | same time: steps | valid bpc |")
print("|---|---:|---:|---:|---:|---:|---:|")
rows = {}
for net in ("lstm", "gru", "mogrifier"):
    steps, timed = (json.loads((out / kind / net / "metrics.json").read_text()) for kind in ("steps", "time"))
    ckpt = torch.load(out / "steps" / net / "checkpoints" / "last.ckpt", weights_only=True)
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("net."))
    speed = steps["history"][-1]["train/chars_per_sec"]
    rows[net] = speed
    print(f"| {net} | {params:,} | {speed:,.0f} | {speed / rows['lstm']:.2f} | {steps['valid']['bpc']:.4f} "
          f"| {timed['steps']:,} | {timed['valid']['bpc']:.4f} |")
PY
