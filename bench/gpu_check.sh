#!/bin/bash
# The GPU check (issue 29): synth-small on 2 partitions with 2 trainers sharing one GPU, against the same run on the
# CPU. DGL from PyPI is CPU-only, so the GPU runs use the plain-torch layers (--model-impl torch, the default on
# cuda); sampling and feature pulls stay DGL's on the CPU. Each GPU run is recorded as a trace and replayed with its
# own decisions: the replayed counts must equal the recorded ones. Prints a few lines of figures (accuracy, epoch
# times, host-to-device seconds, GPU memory, replay) and writes them to OUT/figures.json. Sized for a few minutes
# on a 16-core machine with one H100 (4 runs of 2 epochs, partitioning once).
#
#   bench/gpu_check.sh [OUT]        # OUT: runs, logs, traces, figures (default /tmp/rudder-gpu-check)
#
# Environment: PYTHON (default python3, with rudder importable), CHECK_GRAPH (synth-small), CHECK_EPOCHS (2),
# CHECK_DEVICE (cuda; cpu runs the same steps with the "GPU" runs on the CPU, to try the script on a machine
# without a GPU: no device-buffer run, no CUDA tests).
#
# On the device machine (a bare one: python3 holds a CUDA torch; no network): DGL and the packages it lacks travel
# as wheels in .whl (`bench/gpu_check.sh --wheels`, run here, downloads them: ~28 MB), then, from the checkout:
#   python3 -m pip install -q --no-index --no-deps .whl/*.whl &&           # mpiexec lands beside python3
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
#   PYTHONUNBUFFERED=1 bench/gpu_check.sh $OUT/check 2>&1 | tee $OUT/log
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--wheels" ]; then  # here: the wheels the device machine's Python 3.12 lacks, into .whl
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
        manylinux1_x86_64 manylinux_2_24_x86_64; do platforms+=(--platform "$p"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl dgl==2.1.0 torchdata==0.9.0 gymnasium==1.4.0 farama-notifications==0.0.4 \
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 mpich==5.0.2 \
        mpi4py==4.1.2
    du -sh .whl
    exit 0
fi

OUT=${1:-/tmp/rudder-gpu-check}
GRAPH=${CHECK_GRAPH:-synth-small}
EPOCHS=${CHECK_EPOCHS:-2}
DEVICE=${CHECK_DEVICE:-cuda}
export RUDDER_CACHE=${RUDDER_CACHE:-$OUT/cache} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT"
start=$SECONDS
COMMON=(--graph "$GRAPH" --parts 2 --trainers-per-part 1 --epochs "$EPOCHS" --agent periodic --seed 0)

run() {  # run NAME ARGS...: one training job, its summary in OUT/NAME.json and its output in OUT/NAME.log
    local name=$1
    shift
    echo "gpu_check: [$((SECONDS - start)) s] $name: train.py gnn ${COMMON[*]} $*"
    if ! "$PY" train.py gnn "${COMMON[@]}" "$@" --summary "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
        tail -40 "$OUT/$name.log"
        echo "gpu_check: FAILED: $name (log $OUT/$name.log)"
        exit 1
    fi
}

if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("gpu_check: torch", torch.__version__, "on", torch.cuda.get_device_name(0))'
    # the torch layers on the GPU against DGL's on the CPU, and the device buffer's mirror (short)
    RUDDER_TORCH_MODELS_CUDA=1 "$PY" -m pytest -q -n 0 -p no:cacheprovider tests/test_torch_models.py \
        -k "cuda or outputs or device_rows or same_seed" 2>&1 | tail -3
fi
rm -rf "$OUT"/trace-*
run cpu-dgl --device cpu
run cpu-torch --device cpu --model-impl torch
run gpu --device "$DEVICE" --model-impl torch --trace "$OUT/trace-gpu"
if [ "$DEVICE" = cuda ]; then
    run gpu-devbuf --device cuda --buffer-on-device --trace "$OUT/trace-gpu-devbuf"
fi
echo "gpu_check: [$((SECONDS - start)) s] figures"

"$PY" - "$OUT" <<'EOF'
import json, os, sys

import gymnasium as gym
import numpy as np

import rudder.env  # noqa: F401  (registers the environments)
from rudder.baselines.policies import Recorded
from rudder.evaluation.play import play
from rudder.traces import Trace

out = sys.argv[1]
figures, failed = {}, []
for name in ("cpu-dgl", "cpu-torch", "gpu", "gpu-devbuf"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        continue
    s = json.load(open(path))
    ranks = s["ranks"]
    epochs = np.array([r["epoch_time_s"] for r in ranks])  # [rank, epoch]
    f = dict(
        device=ranks[0]["device"], device_name=ranks[0].get("device_name", ""), impl=ranks[0]["model_impl"],
        val_acc=s["val_acc"], test_acc=s["test_acc"], epoch_s=epochs.max(0).round(2).tolist(),
        fetch_s=round(sum(r["fetch_s"] for r in ranks), 2), compute_s=round(sum(r["compute_s"] for r in ranks), 2),
        h2d_s=round(sum(r.get("h2d_s", 0.0) for r in ranks), 3), h2d_rows=sum(r.get("h2d_rows", 0) for r in ranks),
        gpu_mem_peak_mb=max((r.get("device_memory_peak_mb", 0.0) for r in ranks), default=0.0),
        hit_rate=round(s["totals"]["hit_rate"], 4),
    )
    print(f"gpu_check: {name:11s} {f['device']:6s} {f['impl']:5s} val {f['val_acc']:.4f} test {f['test_acc']:.4f}  "
          f"epoch s {f['epoch_s']}  fetch {f['fetch_s']} s (h2d {f['h2d_s']} s, {f['h2d_rows']} rows)  compute "
          f"{f['compute_s']} s  GPU peak {f['gpu_mem_peak_mb']} MB  hit rate {f['hit_rate']}")
    trace = os.path.join(out, f"trace-{name}")
    if os.path.isdir(trace):  # replayed with its own decisions: the counts must be the recorded ones
        f["replay"] = []
        for rank, live in enumerate(ranks):
            res = play(gym.make("rudder/Replay-v0", trace=trace, rank=rank), Recorded(trace, rank=rank))
            same = all(res[k] == live[k] for k in ("remote_sampled", "hits", "remote_fetched", "prefetched"))
            env = gym.make("rudder/Replay-v0", trace=trace, rank=rank).unwrapped
            table = Trace(trace).rank(rank).table()
            recorded_s = float((table["sample_s"] + table["fetch_s"] + table["compute_s"]).sum())
            copy = env.copy_model
            f["replay"].append(dict(rank=rank, exact=same, modelled_s=round(res["time_s"], 3),
                                    recorded_s=round(recorded_s, 3),
                                    copy_s_per_row=copy.c_row if copy else None, copy_c0_s=copy.c0 if copy else None))
            print(f"gpu_check:   replay rank {rank}: counts {'= recorded' if same else 'DIFFER from recorded'} "
                  f"(hits {res['hits']}, fetched {res['remote_fetched']}); time modelled {res['time_s']:.2f} s vs "
                  f"recorded {recorded_s:.2f} s; copy model "
                  + (f"{copy.c0 * 1e3:.3f} ms + {copy.c_row * 1e9:.1f} ns/row" if copy else "none (CPU trace)"))
            if not same:
                failed.append(f"replay of {name} rank {rank}")
    figures[name] = f
if "cpu-dgl" in figures:
    base = figures["cpu-dgl"]
    for name, f in figures.items():
        if name != "cpu-dgl":
            print(f"gpu_check: {name} vs cpu-dgl: val acc {f['val_acc'] - base['val_acc']:+.4f}, last epoch "
                  f"{f['epoch_s'][-1]:.2f} s vs {base['epoch_s'][-1]:.2f} s ({base['epoch_s'][-1] / max(f['epoch_s'][-1], 1e-9):.2f}x)")
json.dump(figures, open(os.path.join(out, "figures.json"), "w"), indent=1)
if failed:
    sys.exit("gpu_check: FAILED: " + ", ".join(failed))
print("gpu_check: OK")
EOF
echo "gpu_check: [$((SECONDS - start)) s] done; figures in $OUT/figures.json"
