#!/usr/bin/env bash
# kiln's GPU check: tokens/s, MFU and peak memory for gpt2-small at 1024 and llama-1b at 2048,
# ZeRO-2 bf16, through launcher=local and launcher=ray (one worker), plus one ZeRO-3 line and one
# compile-off line. Aimed at one H200 in under 8 minutes (most of it start-up and torch.compile);
# record what it prints, with the date, in docs/benchmarks.md.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine with kiln installed (pip install -e .)
#   KILN_GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh   # the same runs on tiny models: checks the script on a CPU
#
# Data: the default corpus (byte tokens, built once from this Python's standard library) with the
# model vocabulary set to GPT-2's 50257 (padded to 50304): the matrices, and so the speed, of a
# GPT-2-tokenized run; the loss is not the point here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${KILN_GPU_CHECK_DIR:-$(mktemp -d /tmp/kiln-gpu-check.XXXXXX)}
STEPS=${KILN_GPU_CHECK_STEPS:-40}
COMMON=(logger=none precision=bf16 trainer.log_interval=10 "trainer.max_steps=$STEPS" trainer.eval_interval=100000
        trainer.eval_batches=1 trainer.checkpoint_interval=0 data.num_workers=2 model.vocab_size=50257)
if [[ -n "${KILN_GPU_CHECK_SMALL:-}" ]]; then
  GPT=(model=tiny trainer.micro_batch_size=2)
  LLAMA=(model=llama-tiny trainer.micro_batch_size=2)
  COMMON+=(launcher.use_gpu=null)
else
  GPT=(model=gpt2-small trainer.micro_batch_size=16)           # 16 x 1024 tokens per step
  LLAMA=(model=llama-1b trainer.micro_batch_size=4)            # 4 x 2048 tokens per step
fi
python3 - <<'PY' || exit 1
import torch, kiln  # noqa: F401
print(f"[gpu_check] torch {torch.__version__}, device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA: figures are not GPU figures)'}")
PY

results=()
run() {  # run NAME OVERRIDES...: one kiln-train, its summary line appended to the table
  local name=$1; shift
  local dir="$OUT/$name" started=$SECONDS
  timeout 300 kiln-train "${COMMON[@]}" "$@" "hydra.run.dir=$dir" "launcher.storage_path=$OUT/ck-$name" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  results+=("$(python3 - "$dir/summary.json" "$name" "$rc" "$((SECONDS - started))" <<'PY'
import json, sys
path, name, rc, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    s = json.load(open(path))
except OSError:
    print(f"{name:28s} FAILED (exit {rc}; see {path.rsplit('/', 1)[0]}.log)")
    sys.exit()
mfu = f"{100 * s['mfu']:5.1f}%" if s.get("mfu") is not None else "  n/a "
print(f"{name:28s} {s['tokens_per_s'] or 0:>12,.0f} tok/s  MFU {mfu}  peak {s['peak_memory_gib']:6.1f} GiB  "
      f"{wall:>4s} s wall  ({s['parameters']:,} params)")
PY
)")
  echo "${results[-1]}"
}

run gpt2-small-local-zero2 "${GPT[@]}" launcher=local parallelism=zero2
run gpt2-small-ray-zero2 "${GPT[@]}" launcher=ray launcher.num_workers=1 parallelism=zero2
run llama-1b-local-zero2 "${LLAMA[@]}" launcher=local parallelism=zero2
run llama-1b-ray-zero2 "${LLAMA[@]}" launcher=ray launcher.num_workers=1 parallelism=zero2
run gpt2-small-local-zero3 "${GPT[@]}" launcher=local parallelism=zero3
run gpt2-small-local-nocompile "${GPT[@]}" launcher=local parallelism=zero2 trainer.compile=false

echo "[gpu_check] $(date -u +%Y-%m-%dT%H:%MZ), $STEPS steps each (tokens/s and MFU: steady, after the first log interval); logs in $OUT"
printf '%s\n' "${results[@]}"
