"""What a user sees: a training job's terminal (rudder's lines, progress per epoch, the table) apart from DGL's and
MPI's output (in the job's log), training curves, evaluate.py's one progress bar with no warnings, install.sh on a
Python that refuses installs, and the ``rudder`` command."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rudder.runtime.progress import EpochStats, combine, epoch_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TRACE = os.path.join(ROOT, "traces", "samples", "small-metis2-f10x25")
SMALL = ["--graph", "synth-tiny", "--parts", "2", "--epochs", "2", "--batch-size", "100", "--fanout", "3,5"]
# what DGL (C++ and Python) and MPI print in the supervisor (partitioning) and in the ranks
CHATTER = (
    "Converting to homogeneous graph",
    "Metis partitioning",
    "Server is waiting for connections",
    "connect to server successfuly",
    "is exiting",
    "Initialize the distributed services",
    "Server (0) shutdown",
)
EPOCH = re.compile(
    r"^rudder: epoch (\d+)/2  loss ([\d.]+)  hit ([\d.]+)%  fetched ([\d,]+) rows \(([\d,]+) prefetched\)"
    r"  fetch (\d+)% of ([\d.]+) s  (ETA \d+:\d\d|evaluating)$"
)


def _train(args, cache, port, timeout=300):
    env = dict(os.environ, RUDDER_CACHE=cache, OMP_NUM_THREADS="1")
    env.pop("RUDDER_CONSOLE", None)
    return subprocess.run(
        [sys.executable, TRAIN, "gnn", *args, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---------------------------------------------------------------------------------------------- a real job
@pytest.mark.dist
def test_train_terminal_shows_progress_and_the_log_keeps_dgl_output(tmp_path, free_port_block):
    log, summary_path, tb = tmp_path / "job.log", tmp_path / "run.json", tmp_path / "tb"
    proc = _train(
        [*SMALL, "--log", str(log), "--summary", str(summary_path), "--tensorboard", str(tb)],
        str(tmp_path / "cache"),
        free_port_block(),
    )  # a fresh cache: partitioning runs too
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    for marker in CHATTER:
        assert marker not in terminal, marker
    err = proc.stderr.splitlines()
    assert all(line.startswith("rudder: ") for line in err), err
    assert err[0] == f"rudder: DGL and MPI output goes to {log}; --verbose shows it live"
    assert terminal.count(str(log)) == 1
    assert err[1].startswith("rudder: graph synth-tiny: 4000 nodes") and "partitions ready" in err[2]
    assert any(line.startswith("rudder: job: synth-tiny (4,000 nodes, 40,000 edges") for line in err)
    s = json.loads(summary_path.read_text())
    ready = [
        re.match(
            r"rudder: 2 trainers ready in [\d.]+ s: buffers of ([\d,]+) rows in all \((\d+)% of ([\d,]+) "
            r"halo nodes\), (\d+) minibatches per epoch per trainer$",
            line,
        )
        for line in err
    ]
    ready = [m for m in ready if m]
    assert len(ready) == 1, err
    assert int(ready[0][1].replace(",", "")) == sum(r["buffer_capacity"] for r in s["ranks"])
    assert int(ready[0][3].replace(",", "")) == sum(r["halo_nodes"] for r in s["ranks"]) and ready[0][2] == "25"
    assert int(ready[0][4]) * 2 == s["ranks"][0]["minibatches"]
    epochs = [EPOCH.match(line) for line in err if line.startswith("rudder: epoch")]
    assert len(epochs) == 2 and all(epochs), err
    assert len(s["epochs"]) == 2
    for m, e in zip(epochs, s["epochs"]):
        assert int(m[1]) == e["epoch"] and e["trainers"] == 2
        assert int(m[4].replace(",", "")) == e["remote_fetched"] and int(m[5].replace(",", "")) == e["prefetched"]
        assert float(m[3]) == pytest.approx(100 * e["hit_rate"], abs=0.06)
        assert float(m[2]) == pytest.approx(e["loss"], abs=6e-4) and 0 < e["loss"] < 10
        assert e["minibatches"] == sum(r["minibatches"] for r in s["ranks"]) // 2
    assert epochs[0][8].startswith("ETA") and epochs[1][8] == "evaluating"
    # every row fetched after the initial fill is in an epoch
    t = s["totals"]
    fills = sum(r["initial_fill"] for r in s["ranks"])
    assert sum(e["remote_fetched"] for e in s["epochs"]) + fills == t["remote_fetched"]
    assert sum(e["remote_sampled"] for e in s["epochs"]) == t["remote_sampled"]
    assert sum(e["hits"] for e in s["epochs"]) == t["hits"]
    for r in s["ranks"]:
        assert [round(e["seconds"], 2) for e in r["epochs"]] == [round(x, 2) for x in r["epoch_time_s"]]

    table = proc.stdout.splitlines()
    assert table[0].startswith("rudder: synth-tiny on 2 partitions") and table[-1].startswith("val_acc=")
    assert len(table) == 5  # the job, the column names, one row per trainer, accuracies and totals
    text = log.read_text()
    for marker in ("Server is waiting for connections", "connect to server successfuly", "Metis partitioning"):
        assert marker in text, marker
    assert "rudder: epoch 2/2" in text  # rudder's own lines are in the log too, in order with the rest

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list(tb.iterdir())
    assert [r.name for r in runs] == ["synth-tiny-periodic_1"]
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [x.step for x in loss] == [1, 2]
    assert [x.value for x in loss] == pytest.approx([e["loss"] for e in s["epochs"]], abs=1e-4)
    assert [x.value for x in acc.Scalars("traffic/remote_rows_fetched")] == [e["remote_fetched"] for e in s["epochs"]]
    assert acc.Scalars("eval/val_acc")[0].value == pytest.approx(s["val_acc"])


@pytest.mark.dist
def test_a_failing_rank_is_one_line_with_the_log(tmp_path, free_port_block):
    boom = tmp_path / "boom.py"  # an agent whose first decision raises inside every trainer rank
    boom.write_text(
        "class Boom:\n    name = 'boom'\n\n    def reset(self):\n        pass\n\n"
        "    def act(self, observation, info):\n        raise RuntimeError('boom in act')\n"
    )
    log = tmp_path / "job.log"
    proc = _train([*SMALL, "--agent", f"{boom}:Boom", "--log", str(log)], str(tmp_path / "cache"), free_port_block())
    assert proc.returncode != 0
    failed = [line for line in proc.stderr.splitlines() if "job failed" in line]
    assert len(failed) == 1, proc.stderr
    assert re.match(
        r"rudder: job failed: rank \d \(trainer \d of machine \d on .+\): RuntimeError: boom in act "
        rf"\(log: {re.escape(str(log))}\)$",
        failed[0],
    ), failed[0]
    assert "Traceback" not in proc.stderr
    # the details are in the log, whole, even when MPI's abort ends the proxies before they pass on what ranks print
    details = log.read_text()
    assert "Traceback" in details and "raise RuntimeError('boom in act')" in details, details[-3000:]


# ---------------------------------------------------------------------------------------------- pieces, no MPI
def test_epoch_stats_sum_over_trainers_and_format():
    a = EpochStats(
        0,
        minibatches=10,
        loss_sum=20.0,
        remote_sampled=1000,
        hits=400,
        remote_fetched=650,
        prefetched=50,
        fetch_s=0.5,
        seconds=2.0,
    )
    b = EpochStats(
        0,
        minibatches=10,
        loss_sum=10.0,
        remote_sampled=1000,
        hits=600,
        remote_fetched=450,
        prefetched=50,
        fetch_s=0.3,
        seconds=2.0,
    )
    total = EpochStats.from_list(0, [x + y for x, y in zip(a.to_list(), b.to_list())])
    assert total == a + b
    assert total.trainers == 2 and total.loss == 1.5 and total.hit_rate == 0.5 and total.fetch_share == 0.2
    assert total.epoch_s == 2.0
    assert epoch_line(total, 3, 65) == (
        "rudder: epoch 1/3  loss 1.500  hit 50.0%  fetched 1,100 rows (100 prefetched)  fetch 20% of 2.00 s  ETA 1:05"
    )
    assert combine([[a.as_dict()], [b.as_dict()]]) == [total.as_dict()]
    with pytest.raises(ValueError):
        a + EpochStats(1)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, **env),
    )


def test_job_log_captures_c_level_output_and_relays_what_ranks_say(tmp_path):
    """The supervisor's own file descriptors 1 and 2 (C's stdio included) go to the log inside ``capture``; lines
    said by another process through the console file reach the terminal, table on stdout, the rest on stderr."""
    log, console = tmp_path / "job.log", tmp_path / "job" / "console.jsonl"
    proc = _python(f"""
        import ctypes, os, subprocess, sys
        from rudder.runtime.console import JobLog
        log = JobLog({str(log)!r})
        log.attach_console({str(console)!r})
        with log.capture():
            print("python chatter")
            os.write(2, b"fd chatter\\n")
            ctypes.CDLL(None).printf(b"C chatter\\n")
            log.note("rudder: partitioning ...")
        code = "from rudder.runtime.console import say; say('rudder: epoch 1/1'); say('the table', err=False)"
        subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RUDDER_CONSOLE={str(console)!r}),
                       check=True)
        log.relay()
        log.close()
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the table\n"
    assert proc.stderr == (
        f"rudder: DGL and MPI output goes to {log}; --verbose shows it live\n"
        "rudder: partitioning ...\nrudder: epoch 1/1\n"
    )
    text = log.read_text()
    for line in ("python chatter", "fd chatter", "C chatter", "rudder: partitioning ...", "rudder: epoch 1/1"):
        assert line in text.splitlines(), line


def test_verbose_job_log_shows_the_output_live_and_keeps_it(tmp_path):
    log = tmp_path / "job.log"
    proc = _python(f"""
        import ctypes, os, sys
        from rudder.runtime.console import JobLog
        log = JobLog({str(log)!r}, verbose=True)
        with log.capture():
            os.write(1, b"fd chatter\\n")
            ctypes.CDLL(None).printf(b"C chatter\\n")
        child = log.popen([sys.executable, "-c", "print('rank chatter')"])
        child.wait()
        log.close()
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    shown = proc.stderr.splitlines()
    assert shown == ["fd chatter", "C chatter", "rank chatter"], shown  # live, on stderr; nothing announced
    assert log.read_text().splitlines() == shown


def test_say_prints_without_a_supervisor():
    proc = _python(
        "from rudder.runtime.console import say; say('rudder: epoch 1/1'); say('table', err=False)", RUDDER_CONSOLE=""
    )
    assert proc.stdout == "table\n" and proc.stderr == "rudder: epoch 1/1\n"


# ---------------------------------------------------------------------------------------------- evaluate.py
@pytest.mark.llm
def test_evaluate_llm_path_raises_no_future_warning(tmp_path):
    """The LLM agent (the tiny random Llama of test_llm) on one replay with every FutureWarning an error; one
    progress bar and no warning of any kind on stderr."""
    from test_llm import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-llama")
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::FutureWarning",
            os.path.join(ROOT, "evaluate.py"),
            "--traces",
            TRACE,
            "--agents",
            "none,llm",
            "--oracles",
            "belady",
            "--llm-model",
            str(model),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert "Loading weights" not in proc.stderr  # transformers' own bar stays hidden
    updates = proc.stderr.replace("\r", "\n").splitlines()
    assert all(u.startswith("evaluate: ") for u in updates if u.strip()), updates
    assert "6/6" in updates[-1] and "100%" in updates[-1]  # (none, llm, belady) x 2 ranks
    assert "llm" in proc.stdout


# ---------------------------------------------------------------------------------------------- install.sh
def _install_dry_run(tmp_path, python):
    shutil.copy(os.path.join(ROOT, "install.sh"), tmp_path / "install.sh")
    env = dict(os.environ, RUDDER_INSTALL_DRY_RUN="1", PYTHON=python)
    return subprocess.run(["bash", str(tmp_path / "install.sh")], capture_output=True, text=True, timeout=60, env=env)


def test_install_uses_a_venv_for_a_python_that_refuses_installs(tmp_path):
    managed = "/usr/bin/python3"
    marker = (
        subprocess.run(
            [managed, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"], capture_output=True, text=True
        ).stdout.strip()
        if os.path.exists(managed)
        else ""
    )
    if not marker or not os.path.exists(os.path.join(marker, "EXTERNALLY-MANAGED")):
        pytest.skip("no externally managed system Python here")
    proc = _install_dry_run(tmp_path, managed)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "refuses pip installs (externally managed, PEP 668): creating .venv" in lines[0]
    assert lines[1] == f"+ {managed} -m venv .venv"
    pips = [x for x in lines if x.startswith("+ ") and " pip " in x]
    assert pips and all(x.startswith("+ .venv/bin/python -m pip install") for x in pips)
    assert "activate it first (in each new shell): source .venv/bin/activate" in proc.stdout
    assert lines[-2].startswith("  rudder evaluate") and lines[-1].startswith("  rudder train gnn")
    assert not (tmp_path / ".venv").exists()  # a dry run changes nothing


def test_install_uses_a_python_that_accepts_installs_directly(tmp_path):
    proc = _install_dry_run(tmp_path, sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert ".venv" not in proc.stdout
    assert f"+ {sys.executable} -m pip install -e .[dev]" in proc.stdout.splitlines()
    assert "Next:" in proc.stdout and proc.stdout.splitlines()[-1].split()[1:3] == ["train", "gnn"]
    bad = _install_dry_run(tmp_path, str(tmp_path / "no-python"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "set PYTHON=" in bad.stderr


# ---------------------------------------------------------------------------------------------- rudder
def test_rudder_command_lists_its_commands_and_passes_options_on():
    import rudder.cli

    proc = _python("import sys, rudder.cli; sys.exit(rudder.cli.main(['--help']))")
    assert proc.returncode == 0
    for command in ("train", "evaluate", "cluster", "bench"):
        assert re.search(rf"^  {command} +\S", proc.stdout, re.M), command
    for command, expected in (
        ("train", "{gnn,ppo}"),
        ("evaluate", "--traces"),
        ("cluster", "{up,down,list"),
        ("bench", "--quick"),
    ):
        with pytest.raises(SystemExit) as done:
            rudder.cli.main([command, "--help"])
        assert done.value.code == 0
    proc = _python("import sys, rudder.cli; sys.exit(rudder.cli.main(['train', 'gnn', '--help']))")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: rudder train gnn")
    proc = _python("import sys, rudder.cli; sys.exit(rudder.cli.main(['trian']))")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown command 'trian'" in proc.stderr


OTHER_DISTRIBUTIONS = {  # import names other published projects own (Hugging Face's, OpenAI's, ...)
    "evaluate": "0.4.3",
    "traces": "0.6.0",
    "baselines": "0.1.6",
    "train": "0.0.1",
    "bench": "0.1.0",
    "agents": "0.0.1",
}


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """A distribution installed the way pip leaves one (package folder + ``.dist-info`` with RECORD)."""
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(f"OWNER = 'the other {name}'\n")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text(f"{name}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def _venv_with_other_distributions(path: Path) -> tuple[Path, Path]:
    """A fresh venv that sees this Python's packages (torch, DGL, ...) and holds distributions named like rudder's
    folders; (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for name, version in OTHER_DISTRIBUTIONS.items():
        _fake_distribution(site, name, version)
    return python, site


def _pip_install(python: Path, *args: str) -> None:
    import setuptools

    # the build backend from this Python where it can build wheels by itself (setuptools >= 70.1), else pip's own
    # isolated build environment (which fetches setuptools from the package index)
    own = tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    proc = subprocess.run(
        cmd + (["--no-build-isolation"] if own else []) + list(args), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_install_shadows_no_other_distribution(tmp_path, editable):
    """rudder installed (``pip install .`` or ``-e .``) into a venv beside distributions named ``evaluate``,
    ``traces``, ``baselines``, ...: each name still imports its own project, rudder's modules import as
    ``rudder.*`` from this install, and the ``rudder`` command evaluates a shipped trace from any folder."""
    python, site = _venv_with_other_distributions(tmp_path / "venv")
    _pip_install(python, *(["-e", ROOT] if editable else [ROOT]))
    probe = (
        "import json, evaluate, traces, baselines, train, bench, agents, rudder.evaluate, rudder.traces, "
        "rudder.baselines, rudder.agents;"
        "print(json.dumps({n: getattr(__import__(n), 'OWNER', None) for n in "
        "('evaluate', 'traces', 'baselines', 'train', 'bench', 'agents')}));"
        "print(rudder.evaluate.__file__); print(rudder.traces.SAMPLES_DIR)"
    )
    env = dict(os.environ, PYTHONPATH="")
    where = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    owners, module, samples = where.stdout.strip().splitlines()
    assert json.loads(owners) == {name: f"the other {name}" for name in OTHER_DISTRIBUTIONS}
    expected_root = ROOT if editable else str(site / "rudder")
    assert module.startswith(expected_root), module
    assert os.path.isdir(samples) and samples.startswith(ROOT if editable else str(site)), samples
    rudder = tmp_path / "venv" / "bin" / "rudder"
    proc = subprocess.run(
        [str(rudder), "evaluate", "--traces", TRACE, "--agents", "none,static", "--oracles", ""]
        + ["--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "static" in proc.stdout and (tmp_path / "out" / "results.csv").exists()
    helped = subprocess.run([str(rudder), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    from rudder.cli import COMMANDS

    assert helped.stdout.count("\n  ") == len(COMMANDS) and all(f"\n  {c} " in helped.stdout for c in COMMANDS)


def test_train_ppo_writes_tensorboard_curves(tmp_path):
    """``train.py ppo --tensorboard DIR`` passes SB3's ``tensorboard_log``: a ``PPO_1`` run with PPO's scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trace = os.path.join(ROOT, "traces", "samples", "small-random2-f5x10")
    proc = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "ppo",
            "--traces",
            trace,
            "--steps",
            "64",
            "--out",
            str(tmp_path / "p.zip"),
            "--buffer-fractions",
            "recorded",
            "--no-progress",
            "--tensorboard",
            str(tmp_path / "tb"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["PPO_1"]
    acc = EventAccumulator(str(tmp_path / "tb" / "PPO_1"))
    acc.Reload()
    assert "train/value_loss" in acc.Tags()["scalars"] and "time/fps" in acc.Tags()["scalars"]
