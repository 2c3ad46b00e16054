#!/usr/bin/env bash
# Re-record the shipped sample traces (traces/samples/) with real DistDGL runs on this host, and
# beside each its time check: a run of the same options and seed with agent `none`, whose measured timings test the
# replay time model out of sample (traces/timecheck.py). `--time-checks-only` re-records just those.
set -euo pipefail
cd "$(dirname "$0")/.."
out=traces/samples
only_checks=${1:-}
record() {  # name, then train.py options
    local name=$1; shift
    if [[ "$only_checks" != "--time-checks-only" ]]; then
        rm -rf "$out/$name"
        python train.py gnn --graph synth-small --batch-size 1000 --agent periodic --period 4 --seed 0 "$@" \
            --trace "$out/$name"
    fi
    local tmp
    tmp=$(mktemp -d)
    rm -f "$out/$name"/time-check-*.json
    python train.py gnn --graph synth-small --batch-size 1000 --agent none --period 4 --seed 0 "$@" \
        --trace "$tmp/run"
    python -m rudder.traces.timecheck "$tmp/run" --into "$out/$name"
    rm -rf "$tmp"
}
record small-metis2-f10x25 --partition metis --parts 2 --fanout 10,25 --epochs 2
# these two keep the lookahead to the partition's own structure (no halo in-edges): < 20 MB for all samples
record small-random2-f5x10 --partition random --parts 2 --fanout 5,10 --epochs 1 --no-lookahead-halo-edges
record small-metis4-f10x25 --partition metis --parts 4 --fanout 10,25 --epochs 2 --no-lookahead-halo-edges

# on 2 emulated hosts (root only): a shaped link, background prefetch, DGL's several-host mode
record emu2-metis2-f10x25-400mbit --partition metis --hosts 2 --link-rate 400mbit --fanout 10,25 --epochs 2 \
    --no-lookahead-halo-edges
du -sh "$out"/*
