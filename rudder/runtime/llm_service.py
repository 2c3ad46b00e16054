"""One LLM decision service per host for a training job whose trainers run the LLM agent (launcher side).

Without it every trainer rank of a host loads its own copy of the model (about 1.1 GB for SmolLM2-135M in fp32).
With it the launcher starts ``python -m rudder.agents.llm.server`` once per host that runs two or more LLM trainers (on
this host, or inside each emulated host), waits until it serves, and gives the ranks ``--llm-endpoint`` so that
their agents ask it (:class:`rudder.agents.llm.agent.LLMAgent` with ``endpoint=``). The service runs at the priority of
the
background decisions (``--decision-priority``: idle by default, so it uses only CPU time training leaves), and is
stopped when the job ends; its peak resident memory is noted in the job's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

SERVICE_PORT = 8011  # inside an emulated host (its own network namespace): nothing else listens there
START_TIMEOUT_S = 600.0  # the first start converts the GGUF, later ones load the converted folder
_READY = re.compile(r"serving (?P<name>\S+) on (?P<url>http://\S+)/v1 \(pid (?P<pid>\d+)\)")


def trainers_per_host(cfg) -> int:
    """LLM trainer ranks each host runs: every trainer on this host, or one partition's on an emulated host."""
    return cfg.trainers_per_part if (cfg.hosts or cfg.cluster) else cfg.num_trainers


def wanted(cfg) -> bool:
    """Whether the launcher should start services for ``cfg``: the LLM agent, no ``--llm-endpoint`` of the user's,
    ``--llm-service auto`` and two or more trainers per host."""
    return cfg.agent == "llm" and not cfg.llm_endpoint and cfg.llm_service == "auto" and trainers_per_host(cfg) >= 2


def _idle() -> None:
    """``preexec_fn``: SCHED_IDLE, as the background decisions of the trainers (``--decision-priority idle``)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory of a running process (``VmHWM``), MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Services:
    """The services of one job; :meth:`close` stops them (also as a context manager)."""

    def __init__(self, model: str | None = None, priority: str = "idle", note=print):
        self.model = model or "smollm2"
        self.priority = priority
        self.note = note
        self.running: list[tuple[str, subprocess.Popen, int]] = []  # (where, process, server pid)

    def _argv(self, port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "rudder.agents.llm.server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]

    def _wait(self, where: str, proc: subprocess.Popen) -> str:
        """The URL the service prints once it serves; RuntimeError (its own last line) if it exits first."""
        found: dict = {}

        def read():
            for line in proc.stdout:
                m = _READY.search(line)
                if m:
                    found.update(m.groupdict())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not found:
            try:  # it closed its output: it is exiting
                proc.wait(0 if reader.is_alive() else 30)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                err = [f"no answer within {START_TIMEOUT_S:.0f} s"]
            else:
                err = proc.stderr.read().strip().splitlines() or [f"it exited with {proc.returncode}"]
            why = err[-1]
            raise RuntimeError(f"the LLM service on {where} did not start: {why}")
        self.running.append((where, proc, int(found["pid"])))
        return found["url"]

    def _env(self) -> dict:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        return env

    def _popen_kwargs(self) -> dict:
        return dict(
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(),
            preexec_fn=_idle if self.priority == "idle" else None,
        )

    def start_here(self) -> str:
        """One service on this host, on a free loopback port; its URL."""
        proc = subprocess.Popen(self._argv(0), **self._popen_kwargs())
        url = self._wait("this host", proc)
        self.note(f"rudder: LLM service ({self.model}) for this host's trainers at {url}")
        return url

    def start_on(self, cluster, hosts: list[str]) -> str:
        """One service inside each emulated host, all on :data:`SERVICE_PORT` of their own loopback; the URL."""
        url = f"http://127.0.0.1:{SERVICE_PORT}"
        for host in hosts:
            self._wait(host, cluster.run(host, self._argv(SERVICE_PORT), **self._popen_kwargs()))
        self.note(f"rudder: LLM service ({self.model}) inside each of {len(hosts)} hosts at {url}")
        return url

    def close(self) -> None:
        for where, proc, pid in self.running:
            peak = peak_rss_mb(pid)
            if peak is not None:
                self.note(f"rudder: LLM service on {where}: peak RSS {peak:.0f} MB")
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
