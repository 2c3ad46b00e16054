#!/usr/bin/env bash
# Record traces on the emulated cluster (root only: network namespaces joined by tbf-shaped links; docs/cluster.md,
# "Emulated hosts on one machine"), with the options of the shipped sample traces/samples/emu2-metis2-f10x25-400mbit (agent
# periodic, period 4, batch 1000, background prefetch, 2 epochs, the lookahead's structure kept to the partition's
# own: --no-lookahead-halo-edges) and one seed per set:
#   traces/train/    seed 1: three configurations the learned agents (PPO, the LLM's few-shot examples) learn from
#   traces/heldout/  seed 3: three configurations neither sees (another link rate, another partition count, another
#                    graph family), each with its time check (a run of the same options and seed with agent none,
#                    traces/timecheck.py)
# One run at a time, each under the shared heavy lock (RUDDER_HEAVY_LOCK=none when the caller already holds it, e.g.
# `flock /tmp/rudder-heavy.lock env RUDDER_HEAVY_LOCK=none bash traces/record_emulated.sh heldout`).
# Usage: bash traces/record_emulated.sh [train|heldout|NAME...]
# Each run's summary is kept beside this script's log in runs/record-emulated/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=${RUDDER_HEAVY_LOCK:-/tmp/rudder-heavy.lock}
logs=runs/record-emulated
mkdir -p "$logs"

common=(--batch-size 1000 --period 4 --epochs 2 --no-lookahead-halo-edges)

# name -> "set seed options"
declare -A runs=(
    [emu2-metis2-f10x25-250mbit-s1]="train 1 --graph synth-small --partition metis --hosts 2 --link-rate 250mbit --fanout 10,25"
    [emu2-random2-f10x25-400mbit-s1]="train 1 --graph synth-small --partition random --hosts 2 --link-rate 400mbit --fanout 10,25"
    [emu2-metis2-f5x10-800mbit-s1]="train 1 --graph synth-small --partition metis --hosts 2 --link-rate 800mbit --fanout 5,10"
    [emu2-metis2-f10x25-150mbit-s3]="heldout 3 --graph synth-small --partition metis --hosts 2 --link-rate 150mbit --fanout 10,25"
    [emu4-metis4-f10x25-150mbit-s3]="heldout 3 --graph synth-small --partition metis --hosts 4 --link-rate 150mbit --fanout 10,25"
    [emu2-hetero-metis2-f10x25-400mbit-s3]="heldout 3 --graph synth-hetero --partition metis --hosts 2 --link-rate 400mbit --fanout 10,25"
)
order=(emu2-metis2-f10x25-250mbit-s1 emu2-random2-f10x25-400mbit-s1 emu2-metis2-f5x10-800mbit-s1
       emu2-metis2-f10x25-150mbit-s3 emu4-metis4-f10x25-150mbit-s3 emu2-hetero-metis2-f10x25-400mbit-s3)

leftovers() {  # what an emulated run must not leave behind: any network namespace, new /dev/shm entries
    local ns shm
    ns=$(ip netns list)
    shm=$(comm -13 <(echo "$1") <(ls -A /dev/shm | sort))
    [[ -z "$ns" ]] && echo "rudder-record: no network namespace left" || echo "leftover network namespaces: $ns" >&2
    [[ -z "$shm" ]] && echo "rudder-record: no new /dev/shm entry" || echo "new /dev/shm entries: $shm" >&2
}

run_one() {  # name agent trace-dir summary-file, then options
    local name=$1 agent=$2 dir=$3 summary=$4; shift 4
    local shm_before
    shm_before=$(ls -A /dev/shm | sort)
    # the wall time is taken inside the lock: the command's own, not the wait for the lock
    local locked=(flock "$LOCK")
    [[ "$LOCK" != none ]] || locked=()
    "${locked[@]}" bash -c 's=$(date +%s.%N); "$@"; rc=$?; e=$(date +%s.%N)
        echo "rudder-record: command wall $(awk "BEGIN {printf \"%.1f\", $e - $s}") s"; exit $rc' _ \
        python train.py gnn --agent "$agent" "${common[@]}" "$@" --trace "$dir" --summary "$summary" \
        2>&1 | tee "$logs/$name-$agent.log"
    leftovers "$shm_before" 2>&1 | tee -a "$logs/$name-$agent.log"
}

record() {  # name
    local name=$1 spec set seed
    spec=${runs[$name]}
    read -r set seed rest <<<"$spec"
    # shellcheck disable=SC2206
    local opts=($rest --seed "$seed")
    local out=traces/$set/$name
    rm -rf "$out"
    mkdir -p "traces/$set"
    run_one "$name" periodic "$out" "$logs/$name-periodic.json" "${opts[@]}"
    if [[ "$set" == heldout ]]; then
        local tmp
        tmp=$(mktemp -d)
        run_one "$name" none "$tmp/run" "$logs/$name-none.json" "${opts[@]}"
        python -m rudder.traces.timecheck "$tmp/run" --into "$out"
        rm -rf "$tmp"
    fi
    du -sh "$out"
}

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(train heldout)
for t in "${targets[@]}"; do
    for name in "${order[@]}"; do
        read -r set _ <<<"${runs[$name]}"
        if [[ "$t" == "$set" || "$t" == "$name" ]]; then
            record "$name"
        fi
    done
done
