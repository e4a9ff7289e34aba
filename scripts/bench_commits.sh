#!/usr/bin/env bash
# The same kiln-train job at another commit and at this checkout, alternating, in one run: the
# before/after check for loop, engine and data changes. Prints tokens/s and eval loss per run and
# the new/old tokens/s ratio last. Tests never time anything; this script does.
#
#   bash scripts/bench_commits.sh 12773b6                       # launcher=local, ZeRO-2 fp32, 300 steps
#   bash scripts/bench_commits.sh 12773b6 launcher=ray precision=bf16 trainer.max_steps=200
set -euo pipefail
old=${1:?usage: bench_commits.sh OLD_COMMIT [kiln-train overrides...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/kiln-bench-commits-XXXXXX)
trap 'git -C "$repo" worktree remove --force "$tmp/old" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT
git -C "$repo" worktree add --detach "$tmp/old" "$old" >/dev/null 2>&1
job=(launcher=local logger=none trainer.max_steps=300 trainer.log_interval=50 trainer.eval_interval=300
     trainer.checkpoint_interval=0 precision=fp32 parallelism=zero2 "$@")
declare -A rate
for round in 1 2; do
  for side in old new; do
    out=$tmp/$side-$round
    if [ "$side" = old ]; then src=$tmp/old; else src=$repo; fi
    # The old side runs its own source (PYTHONPATH) and finds its own conf/ beside it.
    (cd "$src" && PYTHONPATH=$src/platform python -c \
        "import sys; from kiln.cli.train import main; sys.argv = ['kiln-train'] + sys.argv[1:]; main()" \
        "${job[@]}" "trainer.run_name=bench-$side-$round" "launcher.storage_path=$out-ck" "hydra.run.dir=$out" \
        > "$out.log" 2>&1) || { echo "$side run $round failed: see $out.log"; cat "$out.log" | tail -20; exit 1; }
    line=$(python -c "import json; s = json.load(open('$out/summary.json')); print(f\"{s['tokens_per_s']:.0f} {s['final_eval_loss']:.4f}\")")
    echo "$side round $round: tokens/s ${line% *}  eval loss ${line#* }"
    rate[$side]="${rate[$side]:-} ${line% *}"
  done
done
python - "${rate[old]}" "${rate[new]}" <<'EOF'
import sys
old, new = ([float(x) for x in a.split()] for a in sys.argv[1:])
print(f"ratio new/old tokens/s {sum(new) / sum(old):.2f}")
EOF
