#!/usr/bin/env bash
# Sigmoid or softmax gate for MaxScore: paired seeds (same initial weights and batches),
# baseline `maxscore` (softmax).  Sigmoid gates export as Glm4MoeForCausalLM, which SGLang
# serves exactly; softmax gates as Ernie4_5_MoeForCausalLM, which it does not.  Resumes: the
# finished runs under runs/ are kept.
#   bash benchmarks/sigmoid_study.sh           # tiny preset, 3 seeds x 1000 steps, 2 CPU cores
#   bash benchmarks/sigmoid_study.sh report    # the report of the runs present
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MAXSCORE:-}" ]; then  # the project's .venv, else the installed command
  if [ -x .venv/bin/maxscore ]; then MAXSCORE=.venv/bin/maxscore; else MAXSCORE=maxscore; fi
fi
tiny=benchmarks/results/sigmoid_tiny_cpu-2core_202612
case "${1:-tiny}" in
  tiny)
    "$MAXSCORE" compare --preset tiny --steps 1000 --seeds 3 --device cpu --quiet \
      --routers maxscore,maxscore:score_function=sigmoid --baseline maxscore \
      --out "$tiny/runs" --report "$tiny/report"
    ;;
  report)
    "$MAXSCORE" report "$tiny/runs" --out "$tiny/report" --baseline maxscore
    ;;
  *)
    echo "usage: bash benchmarks/sigmoid_study.sh [tiny|report]" >&2
    exit 2
    ;;
esac
