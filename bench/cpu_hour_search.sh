#!/usr/bin/env bash
# cpu_hour's recipe picked by the project's own search (docs/performance.md): trials of 6 minutes on a tenth of
# the training and validation text keep the hour's passes over the data (about 9 epochs), so a trial sees the
# overfitting the hour does, at a tenth of its time. First the plain recipe at that budget, then the search;
# it prints the command that carries the best trial to the hour. The PTB files are read from $CHARLM_DATA_DIR.
#
#   bash bench/cpu_hour_search.sh [trials, default 6]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-outputs/cpu_hour_search}
PROXY=(experiment=cpu_hour trainer.limit_train_batches=0.1 trainer.limit_val_batches=0.1 trainer.max_time=00:00:06:00
       test=false trainer.enable_progress_bar=false)
mkdir -p "$OUT"
"$PY" train.py "${PROXY[@]}" "hydra.run.dir=$OUT/plain" > "$OUT/plain.log" 2>&1
"$PY" train.py -m hparams_search=optuna "${PROXY[@]}" model.hidden_size=512 data.seq_len=64 \
  "hydra.sweeper.n_trials=${1:-6}" 'model.dropout=interval(0.0,0.3)' 'optimizer.lr=tag(log,interval(0.002,0.01))' \
  'optimizer.weight_decay=tag(log,interval(0.003,0.3))' "hydra.sweep.dir=$OUT/study" > "$OUT/study.log" 2>&1
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plain = json.loads((out / "plain" / "metrics.json").read_text())
search = json.loads((out / "study" / "search.json").read_text())
print(f"plain recipe: valid bpc {plain['best_valid_bpc']:.4f} in {plain['steps']} steps")
for t in search["trials"]:
    value = f"{t['value']:.4f}" if t["value"] is not None else "-"
    print(f"trial {t['number']}: {t['state']:<8} {value}  " + " ".join(f"{k}={v:.4g}" for k, v in t["params"].items()))
best = search["best"]
hour = [o for o in best["command"].split()[2:] if not o.startswith(("trainer.limit_", "trainer.max_time", "trainer.enable_progress_bar", "test=", "hparams"))]
print("to the hour: python train.py " + " ".join(hour))
PY
