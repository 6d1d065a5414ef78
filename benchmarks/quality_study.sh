#!/usr/bin/env bash
# The quality study: which MaxScore recipe trains the best model (paired seeds, tiny preset,
# 2 CPU cores).  Each stage resumes: finished runs under $out/runs/<stage>/ are kept.
#   bash benchmarks/quality_study.sh stage1      # screening: 20 configurations x 3 seeds x 250 steps
#   bash benchmarks/quality_study.sh stage2      # the 4 best of stage 1 (validation), the current
#                                                # default, the paper-faithful pair, normalized flow and
#                                                # iterative rerouting: 5 seeds x 1000 steps
#   bash benchmarks/quality_study.sh stage3      # the 2 best of stage 2 (validation) and the
#                                                # baseline: 3 seeds x 3000 steps
set -euo pipefail
cd "$(dirname "$0")/.."
MAXSCORE=${MAXSCORE:-.venv/bin/maxscore}
PY=${PY:-.venv/bin/python}
out=benchmarks/results/quality_tiny_cpu-2core_202611
baseline="gshard:normalize=true"
stage1=(
  # baselines, SoftTopk off: raw or normalized combine weights x exact flow, GShard, iterative, dropless
  "flow_only:normalize=false" "flow_only:normalize=true"
  "gshard:normalize=false" "gshard:normalize=true"
  "iterative:normalize=false" "iterative:normalize=true"
  "dropless:normalize=false" "dropless:normalize=true"
  "expert_choice"
  # SoftTopk on exact flow: 4 -> 1 over the run, the first 10% or 30%, or 2 -> 1; raw or normalized
  "maxscore:normalize=false" "maxscore:normalize=true"
  "maxscore:schedule.steps=10%:normalize=false" "maxscore:schedule.steps=10%:normalize=true"
  "maxscore:schedule.steps=30%:normalize=false" "maxscore:schedule.steps=30%:normalize=true"
  "maxscore:schedule.start=2:normalize=false" "maxscore:schedule.start=2:normalize=true"
  # the paper's SoftTopk-alone ablation, and capacity factor 1.25
  "softtopk_only:normalize=false"
  "flow_only:normalize=true:capacity_factor=1.25" "gshard:normalize=true:capacity_factor=1.25"
)
join() { local IFS=,; echo "$*"; }
case "${1:-}" in
  stage1)
    "$MAXSCORE" compare --preset tiny --steps 250 --seeds 3 --device cpu --quiet \
      --routers "$(join "${stage1[@]}")" --baseline "$baseline" \
      --out "$out/runs/stage1" --report "$out/stage1"
    ;;
  stage2)
    # selection reads stage 1's validation means only (results.json), never the test split
    chosen=$("$PY" - "$out/stage1/results.json" "$baseline" <<'PYTHON'
import json, sys
rows = json.load(open(sys.argv[1]))["configurations"]  # sorted by mean validation loss
best = [row["label"] for row in rows[:4]]
# the current default and the paper-faithful pair (raw weights), iterative rerouting against exact
# flow at equal weights, and the baseline
fixed = ["maxscore:normalize=false", "gshard:normalize=false", "flow_only:normalize=true",
         "iterative:normalize=true", sys.argv[2]]
print(",".join(dict.fromkeys(best + fixed)))
PYTHON
)
    echo "stage 2 configurations: $chosen" >&2
    "$MAXSCORE" compare --preset tiny --steps 1000 --seeds 5 --device cpu --quiet \
      --routers "$chosen" --baseline "$baseline" \
      --out "$out/runs/stage2" --report "$out/stage2"
    ;;
  stage3)
    # selection reads stage 2's validation means only (results.json), never the test split
    chosen=$("$PY" - "$out/stage2/results.json" "$baseline" <<'PYTHON'
import json, sys
rows = json.load(open(sys.argv[1]))["configurations"]  # sorted by mean validation loss
best = [row["label"] for row in rows if row["label"] != sys.argv[2]][:2]
print(",".join(best + [sys.argv[2]]))
PYTHON
)
    echo "stage 3 configurations: $chosen" >&2
    "$MAXSCORE" compare --preset tiny --steps 3000 --seeds 3 --device cpu --quiet \
      --routers "$chosen" --baseline "$baseline" \
      --out "$out/runs/stage3" --report "$out/stage3"
    ;;
  *)
    echo "usage: bash benchmarks/quality_study.sh stage1|stage2|stage3" >&2
    exit 2
    ;;
esac
