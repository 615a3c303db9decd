#!/usr/bin/env bash
# How busy a search keeps its devices (docs/sweeps.md): hparams_search=optuna on 2 CPU slots, 8 trials of
# very different sizes (hidden size 64 or 256, BPTT 8 or 64), 250 steps each with two validations. Busy is
# the share of the slots' time, from the first job's start to the last one's end, that jobs held a slot:
# sum(released - acquired) / (2 x (last released - first acquired)), from each job's device.json. The PTB
# files are read from $CHARLM_DATA_DIR; each run writes a new directory under outputs/busy/.
#
#   bash bench/busy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-outputs/busy/$(date +%Y-%m-%d_%H-%M-%S)}
SLOTS=2
mkdir -p "$(dirname "$OUT")"
"$PY" train.py -m hparams_search=optuna hydra/launcher=parallel device_pool.cpu_jobs=$SLOTS hydra.sweeper.n_trials=8 \
  'model.hidden_size=choice(64,256)' 'data.seq_len=choice(8,64)' trainer.max_epochs=1 trainer.limit_train_batches=250 \
  trainer.val_check_interval=0.5 trainer.enable_progress_bar=false "hydra.sweep.dir=$OUT" > "$OUT.log" 2>&1
"$PY" - "$OUT" "$SLOTS" <<'PY'
import json, sys
from pathlib import Path
out, slots = Path(sys.argv[1]), int(sys.argv[2])
held = [json.loads(p.read_text()) for p in sorted(out.glob("*/device.json"))]
span = max(h["released"] for h in held) - min(h["acquired"] for h in held)
busy = sum(h["released"] - h["acquired"] for h in held) / (slots * span)
print(f"{len(held)} jobs on {slots} slots, {span:.0f} s from the first start to the last end")
print(f"busy: {busy:.3f}  ({out})")
PY
