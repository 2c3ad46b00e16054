#!/usr/bin/env bash
# Record the training trace(s) the shipped learned agents learned from (traces/train/), with a real DistDGL run on
# this host. Seed 2: another graph and partitioning than every trace `python evaluate.py` scores
# (traces/samples/, seed 0) and than bench P1's (seeds 0 and 1), so no shipped policy or example is scored on what it
# learned from (`python evaluate.py` checks it by content: see traces/fingerprint.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out=traces/train
name=small-metis2-f10x25-s2
rm -rf "$out/$name"
python train.py gnn --graph synth-small --batch-size 1000 --agent periodic --period 4 --seed 2 --partition metis \
    --parts 2 --fanout 10,25 --epochs 2 --no-lookahead-halo-edges --trace "$out/$name"
du -sh "$out"/*
