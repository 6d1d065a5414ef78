#!/usr/bin/env bash
# MaxScore or quantile balancing: paired seeds (same initial weights and batches), baseline
# `maxscore`.  Each stage resumes: the finished runs under its folder's runs/ are kept.
#   bash benchmarks/quantile_study.sh tiny     # tiny preset, 5 seeds x 1000 steps, 2 CPU cores
#   bash benchmarks/quantile_study.sh small    # small preset, 2 seeds x 800 steps, one GPU
#   bash benchmarks/quantile_study.sh report   # the reports of the runs present
# MAXSCORE: the command (default .venv/bin/maxscore, else maxscore); SMALL: the small stage's
# folder.  On a GPU machine, after benchmarks/gpu_check.sh (which installs the package):
#   bash benchmarks/quantile_study.sh small    # about 8 minutes on one H100/H200
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MAXSCORE:-}" ]; then  # the project's .venv, else the installed command
  if [ -x .venv/bin/maxscore ]; then MAXSCORE=.venv/bin/maxscore; else MAXSCORE=maxscore; fi
fi
tiny=benchmarks/results/quantile_tiny_cpu-2core_202612
small=${SMALL:-benchmarks/results/quantile_small_h200_202612}
routers="maxscore,quantile,quantile:drop=true,deepseek_v3,gshard:normalize=true"
case "${1:-}" in
  tiny)
    "$MAXSCORE" compare --preset tiny --steps 1000 --seeds 5 --device cpu --quiet \
      --routers "$routers" --baseline maxscore --out "$tiny/runs" --report "$tiny/report"
    ;;
  small)
    "$MAXSCORE" compare --preset small --steps 800 --seeds 2 --device cuda --quiet \
      --routers maxscore,quantile --baseline maxscore --out "$small/runs" --report "$small/report"
    ;;
  report)
    "$MAXSCORE" report "$tiny/runs" --out "$tiny/report" --baseline maxscore
    if [ -d "$small/runs" ]; then "$MAXSCORE" report "$small/runs" --out "$small/report" --baseline maxscore; fi
    ;;
  *)
    echo "usage: bash benchmarks/quantile_study.sh tiny|small|report" >&2
    exit 2
    ;;
esac
