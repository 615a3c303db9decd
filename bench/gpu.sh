#!/usr/bin/env bash
# One call on a GPU machine, under 14 minutes: the throughput benchmark on the GPU (the course config and
# batch 128 x BPTT 150 x 3x1000, the project in fp32 and in bf16 against the plain fp32 loop), an
# experiment=gpu_best run with a time budget (GPU_BEST_TIME, default 10 minutes), then one table.
#
#   bash bench/gpu.sh          # on a machine with a CUDA GPU
#   bash bench/gpu.sh --cpu    # a dry run on CPU at toy sizes: the same steps, end to end, in a minute or two
#
# It installs nothing: torch, lightning, tensorboard, hydra-core and omegaconf must import (PYTHONPATH
# may point at unpacked wheels). The PTB character files are read from $CHARLM_DATA_DIR, else
# ../shared/data/ptb, else data/ptb. Results go to $OUT (default outputs/bench/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CHARLM_DATA_DIR:-}" ]; then
  for d in ../shared/data/ptb data/ptb; do
    if [ -f "$d/ptb.char.train.txt" ]; then export CHARLM_DATA_DIR="$(cd "$d" && pwd)"; break; fi
  done
fi
if [ ! -f "${CHARLM_DATA_DIR:-}/ptb.char.train.txt" ]; then
  echo "error: no PTB character files; set CHARLM_DATA_DIR to a directory with ptb.char.{train,valid,test}.txt" >&2
  exit 2
fi
OUT=${OUT:-outputs/bench/gpu}
mkdir -p "$OUT"

if [ "${1:-}" = "--cpu" ]; then
  device=cpu
  bench=(--device cpu --configs course --steps 3 --rounds 1)
  run=(trainer.accelerator=cpu data.batch_size=4 data.seq_len=20 model.hidden_size=32 trainer.max_epochs=2
       trainer.check_val_every_n_epoch=1 trainer.limit_train_batches=3 trainer.limit_val_batches=3
       trainer.limit_test_batches=3)
else
  device=cuda
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU; use --cpu for a dry run')"
  bench=(--device cuda --rounds "${BENCH_ROUNDS:-3}")
  # The preset with its schedule laid over the steps that fit in GPU_BEST_TIME (charlm.budget)
  run=(trainer.max_time="${GPU_BEST_TIME:-00:00:10:00}")
fi

echo "== throughput ($device)"
"$PY" bench/throughput.py "${bench[@]}" --json "$OUT/throughput.json" --docs "$OUT/performance.md"

echo "== experiment=gpu_best, short ($device)"
"$PY" train.py experiment=gpu_best "${run[@]}" hydra.run.dir="$OUT/gpu_best" \
  trainer.enable_progress_bar=false > "$OUT/gpu_best.log" 2>&1 \
  || { tail -30 "$OUT/gpu_best.log"; exit 1; }

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
bench = json.loads((out / "throughput.json").read_text())
run = json.loads((out / "gpu_best" / "metrics.json").read_text())
print(f"\n{bench['machine']}, torch {bench['torch']}; peak matmul fp32 {bench['peak_gflops']['fp32']:,.0f}, "
      f"bf16 {bench['peak_gflops']['bf16']:,.0f} GFLOP/s")
print(f"{'config':<12} {'model':<7} {'batch x seq':>11} {'plain fp32':>11} {'project fp32':>12} {'ratio':>6} "
      f"{'project bf16':>12} {'ratio':>6}  (chars/s)")
for c in bench["configs"]:
    cps = c["chars_per_sec"]
    print(f"{c['name']:<12} {c['model']:<7} {c['batch_size']:>5} x {c['seq_len']:<3} {cps['plain']:>11,.0f} "
          f"{cps['project']:>12,.0f} {c['ratio']:>6.2f} {cps['best']:>12,.0f} {c['best_ratio']:>6.2f}")
bpc = {s: f"{run[s]['bpc']:.4f}" if run.get(s) else "-" for s in ("valid", "test")}
print(f"gpu_best with a time budget: {run['status']}, {run.get('steps')} steps in "
      f"{run['wall_time_s']:.0f} s; valid bpc {bpc['valid']}, test bpc {bpc['test']}")
EOF
