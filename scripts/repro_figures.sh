#!/usr/bin/env bash
# Regenerates every figure of docs/reproductions.md (about 10 minutes on 2 cores; the studies run in virtual
# time, so the figures do not depend on the machine's load). Run from the repository root:
#   bash scripts/repro_figures.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/repro}
mkdir -p "$runs" docs/repro
fresh() { rm -rf "$runs/$1"; echo "$runs/$1"; }
# (a) Dutta et al. 2018: K-sync and K-async against wall-clock time
zsgd experiment examples/repro/dutta2018_race.yaml --out "$(fresh dutta2018-race)" --quiet
cp "$runs/dutta2018-race/curves_vs_time.png" docs/repro/dutta2018_race.png
# (b) Lian et al. 2017: D-PSGD against a parameter server as the network slows
zsgd experiment examples/repro/lian2017_bandwidth.yaml --out "$(fresh lian2017-bandwidth)" --jobs 1 --quiet
zsgd plot "$runs/lian2017-bandwidth" --against bandwidth --out docs/repro
zsgd experiment examples/repro/lian2017_latency.yaml --out "$(fresh lian2017-latency)" --jobs 1 --quiet
zsgd plot "$runs/lian2017-latency" --against latency --out docs/repro
# (c) Zhang et al. 2016: staleness-aware learning rate against the number of learners
zsgd experiment examples/repro/zhang2016_staleness.yaml --out "$(fresh zhang2016)" --jobs 1 --quiet
zsgd plot "$runs/zhang2016" --against workers --out docs/repro
echo "figures in docs/repro/"
