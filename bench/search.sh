#!/usr/bin/env bash
# The Optuna search of docs/sweeps.md: hparams_search=optuna at a tenth of an epoch a trial, killed with
# SIGKILL part-way and continued by the same command, then the course's and fast_2x200's configurations
# at the same budget. The PTB files are read from $CHARLM_DATA_DIR.
#
#   bash bench/search.sh [seconds before the kill, default 180]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-outputs/search}
BUDGET=(trainer.max_epochs=1 trainer.limit_train_batches=0.1 trainer.enable_progress_bar=false)
search=("$PY" train.py -m hparams_search=optuna "${BUDGET[@]}" trainer.val_check_interval=0.5
        "hydra.sweep.dir=$OUT/study")

timeout -s KILL "${1:-180}" "${search[@]}" > "$OUT.kill.log" 2>&1 || echo "search killed after ${1:-180} s"
"${search[@]}" > "$OUT.continue.log" 2>&1
for ref in "course=" "fast_2x200=experiment=fast_2x200"; do
  "$PY" train.py "${BUDGET[@]}" ${ref#*=} "hydra.run.dir=$OUT/${ref%%=*}" > "$OUT.${ref%%=*}.log" 2>&1
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
search = json.loads((out / "study" / "search.json").read_text())
states = [t["state"] for t in search["trials"]]
print(f"trials: {len(states)} (" + ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states)) + ")")
print(f"{'run':<12} {'valid bpc':>9} {'test bpc':>9}  values")
best = search["best"]
test = json.loads((Path(out / "study") / Path(search["trials"][best["number"]]["dir"]).name / "metrics.json").read_text())
print(f"{'search best':<12} {best['value']:9.4f} {test['test']['bpc']:9.4f}  trial {best['number']}: "
      + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
for ref in ("course", "fast_2x200"):
    m = json.loads((out / ref / "metrics.json").read_text())
    print(f"{ref:<12} {m['best_valid_bpc']:9.4f} {m['test']['bpc']:9.4f}")
PY
