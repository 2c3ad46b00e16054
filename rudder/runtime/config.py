"""Options of a distributed training run (``train.py gnn``): one dataclass, every option documented once."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field

from rudder.agents.llm.client import EndpointError, base_url
from rudder.agents.ppo import read_policy_meta
from rudder.env.defaults import DEFAULTS, LOOKAHEAD_SAMPLE_AHEAD
from rudder.env.sample_ahead import SampleAhead
from rudder.env.settings import BUFFER_INITS, check, check_fanout
from rudder.evaluation.registry import check_agent, parse_agent_kwargs
from rudder.runtime.partition import graph_name
from rudder.testbed.cluster import ClusterError, parse_rate


def default_cache_dir() -> str:
    return os.environ.get("RUDDER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rudder"))


@dataclass
class TrainConfig:
    graph: str = field(
        default="synth-tiny",
        metadata=dict(
            help="preset (synth-tiny, synth-small, synth-hetero, synth-large), an OGB dataset folder, or a .dgl file"
        ),
    )
    parts: int = field(
        default=0, metadata=dict(help="number of partitions (one graph server each); 0: one per --hosts, else 2")
    )
    trainers_per_part: int = field(default=1, metadata=dict(help="trainer ranks per partition"))
    partition: str = field(default="metis", metadata=dict(choices=("metis", "random"), help="partitioning method"))
    model: str = field(default="sage", metadata=dict(choices=("sage", "gat"), help="GNN model"))
    device: str = field(
        default="cpu",
        metadata=dict(
            choices=("cpu", "cuda"),
            help="where the model trains: cuda puts each trainer's model, loss and input rows on a GPU, chosen by "
            "its local rank among the host's trainers (--trainers-per-part = GPUs per node; several trainers may "
            "share one); sampling and feature pulls stay on the CPU",
        ),
    )
    model_impl: str = field(
        default="auto",
        metadata=dict(
            choices=("auto", "dgl", "torch"),
            help="GNN layers: dgl (DGL's SAGEConv/GATConv; on cuda only with a DGL built with CUDA) or torch (the "
            "same layers in plain torch from each block's edges: rudder/runtime/models.py); auto: dgl on cpu, "
            "torch on cuda",
        ),
    )
    buffer_on_device: bool = field(
        default=False,
        metadata=dict(
            help="with --device cuda: hold the prefetch buffer's rows on the GPU, so that buffer hits are not "
            "copied host-to-device every minibatch (only pulled rows are)"
        ),
    )
    fanout: str = field(default=DEFAULTS.fanout, metadata=dict(help="neighbours sampled per layer, input layer last"))
    batch_size: int = field(default=DEFAULTS.batch_size, metadata=dict(help="seed nodes per minibatch"))
    epochs: int = field(default=1, metadata=dict(help="training epochs"))
    hidden: int = field(default=128, metadata=dict(help="hidden width"))
    lr: float = field(default=0.003, metadata=dict(help="Adam learning rate"))
    seed: int = field(default=0, metadata=dict(help="seed for the graph, partitioning, model and sampling"))
    agent: str = field(
        default="periodic",
        metadata=dict(
            help="prefetch agent: none, static, periodic, hitrate, lookahead, vip, ppo, llm, recorded (with "
            "--decisions-from), a name an installed package registers (rudder.agents entry points), or a "
            "reference module.path:Class or path/to/file.py:Class (every trainer rank builds one)"
        ),
    )
    agent_kwargs: str = field(
        default="",
        metadata=dict(
            help="options passed to the agent's constructor: a JSON object ('{\"threshold\": 0.3}') or "
            "key=value,key2=value2"
        ),
    )
    llm_endpoint: str | None = field(
        default=None,
        metadata=dict(
            help="with --agent llm: an OpenAI-compatible completions endpoint (rudder's "
            "python -m rudder.agents.llm.server, vLLM, ...) the agents ask instead of loading the model in every "
            "trainer rank"
        ),
    )
    llm_service: str = field(
        default="auto",
        metadata=dict(
            choices=("auto", "off"),
            help="with --agent llm and no --llm-endpoint: auto starts one LLM service per host running two or more "
            "trainers and points them at it (one model copy per host); off: every trainer loads its own",
        ),
    )
    buffer_fraction: float = field(
        default=DEFAULTS.buffer_fraction, metadata=dict(help="buffer capacity as a fraction of halo nodes")
    )
    buffer_init: str = field(
        default=DEFAULTS.buffer_init,
        metadata=dict(
            choices=BUFFER_INITS,
            help="initial buffer content: degree (most-connected halo nodes), random, empty, or "
            "vip (highest vertex inclusion probability, SALIENT++)",
        ),
    )
    alpha: float = field(default=DEFAULTS.alpha, metadata=dict(help="score decay per minibatch"))
    period: int = field(default=DEFAULTS.period, metadata=dict(help="minibatches per decision window"))
    admit_on_miss: bool = field(
        default=DEFAULTS.admit_on_miss, metadata=dict(help="let fetched misses enter free/evictable slots")
    )
    candidates: int = field(
        default=DEFAULTS.candidates, metadata=dict(help="K: ranked candidates offered per decision (action size)")
    )
    reward: str = field(default=DEFAULTS.reward, metadata=dict(choices=("traffic", "time"), help="environment reward"))
    decisions: str = field(
        default="auto",
        metadata=dict(
            choices=("auto", "sync", "async"),
            help="take decisions between windows (sync) or in the background while training goes on (async); "
            "auto: async for the LLM agent",
        ),
    )
    decision_priority: str = field(
        default="idle",
        metadata=dict(
            choices=("idle", "normal"),
            help="OS priority of background decisions: idle (SCHED_IDLE: only CPU time training leaves unused) or "
            "normal",
        ),
    )
    decisions_from: str | None = field(
        default=None,
        metadata=dict(
            help="with --agent recorded: a trace whose prefetch decisions are applied again at the same minibatches"
        ),
    )
    trust_policy: bool = field(
        default=False,
        metadata=dict(
            help="with --agent ppo: load the policy even if its SHA-256 is not the one its sidecar records (loading a "
            "policy runs pickled code: only for a file from a source you trust)"
        ),
    )
    sample_ahead: int | str | None = field(
        default=None,
        metadata=dict(
            help="how far sampling runs ahead of training, across epochs: a count of minibatches (4), a budget of "
            "sampled blocks (64MB; KB, MB, GB) or 'epoch'; the lookahead knows those minibatches' remote rows "
            f"exactly (rudder_env/sample_ahead.py). Default: the agent's own (the lookahead: "
            f"{LOOKAHEAD_SAMPLE_AHEAD}), else {DEFAULTS.sample_ahead}"
        ),
    )
    prefetch: str = field(
        default=DEFAULTS.prefetch,
        metadata=dict(
            choices=("background", "inline"),
            help="how a decided prefetch set is pulled: by a background worker in chunks while training goes on, rows "
            "entering the buffer as they arrive (background), or together with the next minibatch's misses, on "
            "the critical path (inline)",
        ),
    )
    overlap_fetch: bool = field(
        default=False,
        metadata=dict(
            help="pull the next sampled minibatch's local rows and buffer misses during this minibatch's compute "
            "(needs --sample-ahead >= 1; where it pays off: BENCHMARKS.md, P2)"
        ),
    )
    lookahead_halo_edges: bool = field(
        default=True,
        metadata=dict(
            help="sampler lookahead also pulls the halo nodes' in-edges from the servers once (sees the second hop "
            "through them; ~2 MB more per rank in a trace)"
        ),
    )
    trace: str | None = field(default=None, metadata=dict(help="record a trace of the run into this folder"))
    overwrite: bool = field(
        default=False, metadata=dict(help="replace a trace already in the --trace folder (without: refused at start)")
    )
    check_env: bool = field(
        default=False, metadata=dict(help="run gymnasium's check_env on every trainer's live env before training")
    )
    num_samplers: int = field(default=0, metadata=dict(help="DGL sampler worker processes per trainer"))
    port: int = field(
        default=0,
        metadata=dict(
            help="first TCP port: machine m's servers listen on port+10*m, torch.distributed on port-1; "
            "0: the first free block from 30050 on"
        ),
    )
    cache_dir: str = field(
        default_factory=default_cache_dir,
        metadata=dict(help="where graphs and partitions are cached (a shared filesystem on several hosts)"),
    )
    repartition: bool = field(
        default=False,
        metadata=dict(
            help="partition the graph again even if partitions are cached (e.g. after a damaged partition file)"
        ),
    )
    summary: str | None = field(default=None, metadata=dict(help="write the run summary JSON here"))
    verify_rows: bool = field(
        default=False,
        metadata=dict(
            help="check every input row against a direct DistTensor pull, and column 0 against the original node id"
        ),
    )
    timeout_s: float = field(default=0.0, metadata=dict(help="kill the job after this many seconds (0: never)"))
    watchdog_s: float = field(
        default=30.0,
        metadata=dict(
            help="end the job when a trainer makes no progress (no minibatch, fetch, decision...) for max(this, "
            "20 x its slowest step so far) seconds once training runs (0: no watchdog)"
        ),
    )
    startup_timeout_s: float = field(
        default=600.0,
        metadata=dict(
            help="end the job when a trainer has not started training this many seconds after its rank started "
            "(0: never)"
        ),
    )
    hosts: int = field(
        default=0,
        metadata=dict(
            help="run on this many emulated hosts on this machine (network namespaces on a bridge, links shaped to "
            "--link-rate, DGL's several-host mode unpatched), one partition each; root only. 0: every rank on "
            "this host over loopback"
        ),
    )
    link_rate: str | None = field(
        default=None,
        metadata=dict(
            help="with --hosts: each emulated host's egress rate in tc's units (e.g. 500mbit, 1gbit); default: unshaped"
        ),
    )
    cluster: str | None = field(
        default=None,
        metadata=dict(
            help="run on the emulated cluster NAME brought up beforehand (`python -m rudder.testbed.cluster up`), "
            "one partition per host, instead of a fresh one per job"
        ),
    )
    adopt_cluster: bool = field(
        default=False,
        metadata=dict(
            help="with --cluster: run on it even if the process that brought it up is gone; this job then owns it "
            "and tears it down at its end (without: refused, in one line)"
        ),
    )
    scenario: str | None = field(
        default=None,
        metadata=dict(
            help="with --hosts and --link-rate (or --cluster with a shaped link): play this scenario file's link and "
            "co-tenant timelines (rudder_env/scenario.py) on the emulated hosts' links while the job runs, as tc rate "
            "changes on schedule (factors of the link rate); --trace keeps what was played (conditions.json), so "
            "replay follows the rates each rank met"
        ),
    )
    log: str | None = field(
        default=None,
        metadata=dict(
            help="the job's log file: DGL's and MPI's output from every rank (default: a new file under "
            "<cache-dir>/logs, whose path is printed; only when train.py starts mpiexec itself)"
        ),
    )
    verbose: bool = field(default=False, metadata=dict(help="also show DGL's and MPI's output on the terminal, live"))
    tensorboard: str | None = field(
        default=None,
        metadata=dict(
            help="write per-epoch scalars (loss, hit rate, rows fetched, fetch share, epoch time, accuracy) for "
            "TensorBoard into a new run folder under this folder"
        ),
    )

    def __post_init__(self):
        if self.parts == 0:
            self.parts = self.hosts or 2
        if isinstance(self.sample_ahead, str) and self.sample_ahead.strip().isdigit():
            self.sample_ahead = int(self.sample_ahead)  # a count stays a number in the summary

    def resolve_sample_ahead(self, settings) -> None:
        """Fill an unset ``--sample-ahead`` from the agent's buffer settings (the lookahead samples further ahead:
        it knows the future only that far), else the run default; what is resolved is what the trace records."""
        if self.sample_ahead is None:
            self.sample_ahead = settings.sample_ahead or DEFAULTS.sample_ahead
            self.__post_init__()  # "4" stays a count

    @property
    def fanouts(self) -> list[int]:
        return check_fanout(self.fanout)

    @property
    def impl(self) -> str:
        """The model implementation ``--model-impl`` resolves to (auto: dgl on cpu, torch on cuda)."""
        if self.model_impl == "auto":
            return "dgl" if self.device == "cpu" else "torch"
        return self.model_impl

    @property
    def num_trainers(self) -> int:
        return self.parts * self.trainers_per_part

    @property
    def world_size(self) -> int:
        return self.parts + self.num_trainers

    def agent_options(self, trainer_rank: int = 0) -> dict:
        """Constructor options of the agent on trainer ``trainer_rank``: ``--agent-kwargs``, and for ``recorded``
        the trace and rank whose decisions it plays; for ``ppo``, whether to trust a policy file
        (``--trust-policy``)."""

        options = parse_agent_kwargs(self.agent_kwargs)
        if self.agent == "recorded":
            options.update(trace=self.decisions_from, rank=trainer_rank)
        if self.agent == "ppo" and self.trust_policy:
            options.update(trust=True)
        if self.agent == "llm" and self.llm_endpoint:
            options.update(endpoint=self.llm_endpoint)
        return options

    def validate(self) -> None:
        """Raise ValueError with a one-line message for options that cannot work (an agent that cannot be found,
        or whose constructor does not take ``--agent-kwargs``, included)."""

        if (self.agent == "recorded") != (self.decisions_from is not None):
            raise ValueError("--agent recorded and --decisions-from TRACE go together")
        if self.decisions_from is not None and not os.path.isdir(self.decisions_from):
            raise ValueError(f"--decisions-from {self.decisions_from}: no such trace folder")
        if self.decisions_from is not None:
            self._check_decisions_trace()
        if self.llm_endpoint is not None:
            if self.agent != "llm":
                raise ValueError(f"--llm-endpoint is for --agent llm, got --agent {self.agent}")
            try:
                base_url(self.llm_endpoint)
            except EndpointError as exc:
                raise ValueError(str(exc)) from None
        check_agent(self.agent, self.agent_options())
        if self.agent == "ppo":
            read_policy_meta(None, trust=self.trust_policy)  # refused here, before any process starts
        for name in (
            "parts",
            "trainers_per_part",
            "buffer_fraction",
            "alpha",
            "period",
            "batch_size",
            "epochs",
            "hidden",
            "lr",
            "candidates",
            "num_samplers",
            "timeout_s",
            "watchdog_s",
            "startup_timeout_s",
            "reward",
            "buffer_init",
            "prefetch",
        ):
            check(name, getattr(self, name))
        check_fanout(self.fanout)

        if self.sample_ahead is not None:
            SampleAhead.parse(self.sample_ahead, "--sample-ahead")
        if self.hosts < 0 or self.hosts == 1:
            raise ValueError(f"--hosts must be 0 (this host) or >= 2 emulated hosts, got {self.hosts}")
        if self.hosts and self.parts != self.hosts:
            raise ValueError(
                f"--hosts {self.hosts} runs one partition per host: --parts must be {self.hosts} "
                f"(or left out), got {self.parts}"
            )
        if self.link_rate is not None:
            if not self.hosts:
                raise ValueError("--link-rate shapes the links of emulated hosts: it needs --hosts N")

            try:
                parse_rate(self.link_rate)
            except ClusterError as exc:
                raise ValueError(f"--link-rate: {exc}") from None
        if self.cluster is not None and (self.hosts or self.link_rate):
            raise ValueError(
                "--cluster runs on an existing emulated cluster: leave out --hosts and --link-rate "
                "(its own host count and link rate apply)"
            )
        if self.scenario is not None:
            self._check_scenario()
        if self.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self._check_device()
        if self.port != 0 and not 1024 <= self.port <= 65535 - 10 * self.parts:
            raise ValueError(f"--port must leave room for {self.parts} machines below 65536, got {self.port}")

    def _check_scenario(self) -> None:
        """--scenario: a scenario file that can be played on emulated hosts: rate changes, competing flows, CPU caps."""
        from rudder.env.scenario import Scenario, ScenarioError

        if not (self.hosts or self.cluster):
            raise ValueError("--scenario plays link rates on emulated hosts: it needs --hosts N (or --cluster NAME)")
        if self.hosts and self.link_rate is None:
            raise ValueError("--scenario changes each link's rate as factors of --link-rate: give --link-rate")
        try:
            scenario = Scenario.load(self.scenario)
        except OSError as exc:
            raise ValueError(f"--scenario {self.scenario}: {exc.strerror}") from None
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
        if scenario.feature_bytes_factor != 1.0:
            raise ValueError(
                f"--scenario {self.scenario}: feature_bytes_factor cannot be played on a live run (the graph's rows "
                "are as wide as they are): replay it instead (evaluate.py --scenario)"
            )
        for i, proc in enumerate(scenario.processes):
            if proc["kind"] == "straggler" and float(proc["factor"]) < 1.0:
                raise ValueError(
                    f"--scenario {self.scenario}: processes[{i}].factor: a straggler played live can only slow its "
                    f"host (a CPU cap): expected >= 1, got {proc['factor']}"
                )
        if any(p["kind"] == "straggler" for p in scenario.processes):
            from rudder.testbed.cluster import cpu_cgroup_root

            if cpu_cgroup_root() is None:
                raise ValueError(
                    f"--scenario {self.scenario}: a straggler is played live as a CPU cap, and this machine has no "
                    "writable CPU cgroup controller: replay it instead (evaluate.py --scenario)"
                )

    def _check_device(self) -> None:
        """``--device cuda`` needs a GPU torch can see; ``--model-impl dgl`` on it needs a DGL built with CUDA;
        ``--buffer-on-device`` needs ``--device cuda``."""
        if self.buffer_on_device and self.device != "cuda":
            raise ValueError("--buffer-on-device holds the buffer's rows on the GPU: it needs --device cuda")
        if self.device != "cuda":
            return
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda: torch {torch.__version__} sees no GPU on this host (torch.cuda.is_available() is "
                "False): use --device cpu"
            )
        if self.impl == "dgl":
            from rudder.runtime.models import dgl_has_cuda

            if not dgl_has_cuda():
                raise ValueError(
                    "--model-impl dgl --device cuda needs a DGL built with CUDA; this DGL is CPU-only (the PyPI "
                    "wheel): use --model-impl torch"
                )

    def _check_decisions_trace(self) -> None:
        """The ``--decisions-from`` trace must come from a run on the same graph, partitioned the same way, with as
        many trainers: its decisions name node ids of that run's partitioning (DistDGL renumbers nodes per
        partitioning) and are played per trainer rank."""
        from rudder.traces import Trace

        trace = Trace(self.decisions_from)
        recorded = trace.meta.get("config", {})
        part = trace.meta.get("graph", {})
        pairs = [
            ("graph", part.get("graph_name"), graph_name(self)),
            ("--parts", recorded.get("parts"), self.parts),
            ("--partition", recorded.get("partition"), self.partition),
            ("trainer ranks", trace.num_ranks, self.num_trainers),
        ]
        for what, then, now in pairs:
            if then != now:
                raise ValueError(
                    f"--decisions-from {self.decisions_from}: recorded with {what} {then!r}, this run "
                    f"has {now!r}: its decisions name nodes of that run's partitions and cannot be "
                    f"applied here"
                )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """Add one ``--option`` per dataclass field, with its help, default and choices."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta = dict(f.metadata)
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(
            flag,
            type=kind,
            default=default,
            help=f"{meta['help']} (default: {default})",
            **({"choices": meta["choices"]} if "choices" in meta else {}),
        )


def from_namespace(ns: argparse.Namespace, cls=TrainConfig):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
