"""The LLM decision service (rudder.agents.llm.server) and the agent's endpoint mode (rudder.agents.llm.client): the
engine's
batched, prefix-reusing scores equal plain forward passes (tiny random Llama); one-line errors for an unreachable
endpoint, the wrong API shape and a missing model; and with the real SmolLM2 served on a loopback port (``-m llm``):
the same decisions as the local model on a shipped trace, and concurrent clients batched with the answers they get
one at a time."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import urllib.request  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from rudder.agents.llm import models as llm_models  # noqa: E402
from rudder.agents.llm.client import EndpointClient, EndpointError  # noqa: E402
from rudder.agents.llm.server import Engine  # noqa: E402
from test_llm import make_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "traces" / "samples" / "small-metis2-f10x25"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer, _ = llm_models.load_model(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
    return model, tokenizer


def plain_logprobs(model, row):
    """log p(token i | tokens < i), i >= 1, from one plain forward pass of the row alone."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([row])).logits[0]
        return torch.log_softmax(logits.float(), -1)[:-1].gather(1, torch.tensor(row[1:])[:, None])[:, 0].tolist()


def test_engine_batches_rows_with_different_cached_prefixes_exactly(tiny):
    """Rows reusing cached prefixes of different lengths (left-padded, masked, own positions), rows with none, rows
    of several requests in one pass, and options whose shared part is prefilled once: every echoed log-probability
    equals the row's own plain forward pass."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, "tiny", prefix_entries=4, min_prefix=8)
    enc = engine.encode
    a = enc("hit rate traffic rows buffer minibatch decision remote rows sampled fetched " * 3)
    b = enc("stale candidates prefetched buffer rows " * 4)
    first = engine.score([[a], [b]], top_n=3)  # nothing cached: two plain rows in one pass; both prompts are kept
    assert engine.forward_passes == 1 and len(engine._entries) == 2
    rows = [
        a + enc(' {"decision": "keep"}'),
        a + enc(' {"decision": "replace"}'),
        b + enc(" hit rate"),
        enc("decision traffic"),
    ]
    passes = engine.forward_passes
    second = engine.score([rows[:2], rows[2:3], rows[3:]], top_n=3)
    assert engine.forward_passes == passes + 1  # three requests, two cached prefixes and a plain row: one pass
    assert engine.tokens_prefilled < 2 * len(a) + len(b) + sum(map(len, rows))
    for got, row in zip([first[0][0], first[1][0]] + [s for r in second for s in r], [a, b] + rows):
        assert got.tokens == row and got.token_logprobs[0] is None
        np.testing.assert_allclose(got.token_logprobs[1:], plain_logprobs(model, row), atol=1e-4)
    # the options of one prompt sharing far more than is kept: the shared part is prefilled once, then each option
    shared = b + enc(" hit rate traffic rows buffer minibatch decision remote rows sampled fetched" * 2)
    options = [shared + enc(' {"decision": "keep"}'), shared + enc(' {"decision": "replace"}')]
    passes, prefilled = engine.forward_passes, engine.tokens_prefilled
    third = engine.score([options], top_n=3)
    assert engine.forward_passes == passes + 2
    assert engine.tokens_prefilled - prefilled < len(shared) - len(b) + 2 * (len(options[1]) - len(shared)) + 4
    for got, row in zip(third[0], options):
        np.testing.assert_allclose(got.token_logprobs[1:], plain_logprobs(model, row), atol=1e-4)
    top = second[0][0].top
    assert len(top) == len(rows[0]) and top[0] == [] and all(len(t) == 3 for t in top[1:])
    assert all(max(lp for _, lp in t) >= got for t, got in zip(top[1:], second[0][0].token_logprobs[1:]))


# ---------------------------------------------------------------------------------------------- errors
class FakeAPI(BaseHTTPRequestHandler):
    """An HTTP server that is not the API the agent needs (for the error paths only)."""

    answers: dict = {}

    def log_message(self, *args):
        pass

    def _answer(self):
        data = json.dumps(self.answers.get(self.path, {"detail": "Not Found"})).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _answer

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()


@pytest.fixture
def fake_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_unreachable_endpoint_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        EndpointError,
        match=r"^LLM endpoint http://127\.0\.0\.1:\d+/v1: unreachable \(.*refused.*\); "
        r"start one with: python -m agents\.llm_server",
    ) as err:
        EndpointClient(url)
    assert "\n" not in str(err.value)
    with pytest.raises(EndpointError, match="expected an http:// or https:// URL"):
        EndpointClient("localhost:8011")


def test_wrong_api_shape_is_one_line(fake_api):
    FakeAPI.answers = {"/v1/models": {"models": ["x"]}}
    with pytest.raises(
        EndpointError, match=r"/v1/models: expected the OpenAI shape .* got an object with keys models$"
    ):
        EndpointClient(fake_api)
    FakeAPI.answers = {
        "/v1/models": {"data": [{"id": "m"}]},
        "/v1/completions": {"choices": [{"index": 0, "text": "hi"}, {"index": 1, "text": "hi"}]},
    }
    client = EndpointClient(fake_api)
    assert client.model == "m"
    with pytest.raises(
        EndpointError, match="answered without echo log-probabilities .*must support echo with logprobs"
    ):
        client.echo_logprobs(["a", "b"])
    with pytest.raises(EndpointError, match=r"model 'gpt-17' is missing \(it serves: m\)"):
        EndpointClient(fake_api, "gpt-17")


def test_service_with_a_missing_model_exits_with_one_line(tmp_path):
    """The service exits 2 with one line naming the missing model; the launcher reports that line."""
    from rudder.runtime.llm_service import Services

    missing = tmp_path / "nothing.gguf"
    with pytest.raises(RuntimeError) as err, Services(str(missing), priority="normal", note=lambda line: None) as s:
        s.start_here()
    assert str(err.value) == (
        f"the LLM service on this host did not start: rudder-llm: error: GGUF file {missing} does not exist"
    )


# ---------------------------------------------------------------------------------------------- the real model served
@pytest.fixture(scope="module")
def service():
    """The real SmolLM2 service on a free loopback port (a wide batch window, so that concurrent requests surely
    meet)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rudder.agents.llm.server",
            "--model",
            "smollm2",
            "--port",
            "0",
            "--batch-window-ms",
            "300",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    line = proc.stdout.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
    assert m, f"the service did not start: {line!r}"
    yield m.group(1)
    proc.terminate()
    proc.wait(10)


def stats(url):
    with urllib.request.urlopen(url + "/stats") as r:
        return json.load(r)


def queried_points(rank: int, n: int):
    """(observation, info) of the first ``n`` decision points of the sample trace where the LLM is asked (some
    candidate can be admitted), playing periodic."""
    from rudder.bench.llm_decisions import decision_points

    points = decision_points(str(TRACE), n, rank)[0]
    assert len(points) == n  # the trace has that many before it ends
    return points


@pytest.mark.llm
def test_endpoint_agent_decides_as_the_local_model(service, tmp_path):
    """On the shipped trace's first 3 asked decisions, the agent asking the service takes the decisions the agent with
    the local model takes, from the same scores; the service never prefilled the shared prefix again."""
    from rudder.agents.llm.agent import LLMAgent

    local = LLMAgent(log_path=tmp_path / "local.jsonl")
    remote = LLMAgent(endpoint=service, log_path=tmp_path / "remote.jsonl")
    assert remote.model is None and remote.model_name == "SmolLM2-135M-Instruct.Q4_1"
    points = queried_points(0, 3)
    remote.warm_up(points[0][1])
    before = stats(service)
    for obs, info in points:
        assert remote.prompt(obs, info).text == local.prompt(obs, info).text
        np.testing.assert_array_equal(local.act(obs, info), remote.act(obs, info))
    after = stats(service)
    logs = [
        [
            json.loads(x)
            for x in (tmp_path / f"{who}.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "decision"
        ]
        for who in ("local", "remote")
    ]
    assert len(logs[0]) == len(logs[1]) == 3
    for mine, theirs in zip(*logs):
        assert mine["decision"] == theirs["decision"] and mine["prompt_sha256"] == theirs["prompt_sha256"]
        np.testing.assert_allclose(
            [theirs["option_scores"][o] for o in mine["option_scores"]], list(mine["option_scores"].values()), atol=1e-3
        )
    prefix = local.prompt(*points[-1]).prefix
    prefix_tokens = len(remote.tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert after["rows_scored"] - before["rows_scored"] == 6  # 3 decisions x 2 options
    # each decision: its prompt past the prefix, once (not once per option), and the options' answers
    assert after["tokens_prefilled"] - before["tokens_prefilled"] < sum(
        t["prefill_tokens"] // 2 - prefix_tokens + 20 for t in logs[1]
    )


@pytest.mark.llm
def test_concurrent_clients_are_batched_with_the_answers_they_get_alone(service):
    """Two trainers (ranks 0 and 1: different system prompts) asking at once get one batch, and exactly the scores
    each gets asking alone."""
    from rudder.agents.llm.agent import LLMAgent

    agents = [LLMAgent(endpoint=service), LLMAgent(endpoint=service)]
    prompts = [agents[r].prompt(*queried_points(r, 1)[0]) for r in (0, 1)]
    alone = [agents[r].option_scores(p.prefix, p.suffix)[0] for r, p in enumerate(prompts)]
    together: list = [None, None]

    def ask(r):
        together[r] = agents[r].option_scores(prompts[r].prefix, prompts[r].suffix)[0]

    before = stats(service)
    threads = [threading.Thread(target=ask, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(service)
    assert after["batches"] - before["batches"] == 1 and after["forward_passes"] - before["forward_passes"] == 1
    for a, b in zip(alone, together):
        assert max(a, key=a.get) == max(b, key=b.get)
        np.testing.assert_allclose([b[o] for o in a], list(a.values()), atol=1e-4)


@pytest.mark.llm
def test_real_service_api_shapes_and_missing_model(service):
    """The OpenAI shapes a generic client reads: models, echo with logprobs and text offsets, generation, chat; a
    model the service does not serve is named in one line."""
    with pytest.raises(EndpointError, match=r"model 'gpt-17' is missing \(it serves: SmolLM2-135M-Instruct\.Q4_1\)"):
        EndpointClient(service, "gpt-17")
    body = json.dumps(dict(prompt=["The cat", "A dog"], max_tokens=2, echo=True, logprobs=2, temperature=0)).encode()
    req = urllib.request.Request(service + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        got = json.load(r)
    assert got["object"] == "text_completion" and [c["index"] for c in got["choices"]] == [0, 1]
    for c, prompt in zip(got["choices"], ["The cat", "A dog"]):
        lp = c["logprobs"]
        assert c["text"].startswith(prompt) and len(c["text"]) > len(prompt)
        assert lp["token_logprobs"][0] is None and all(x < 0 for x in lp["token_logprobs"][1:])
        assert "".join(lp["tokens"]) == c["text"] and lp["text_offset"][0] == 0
        assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    chat = json.dumps(dict(messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0)).encode()
    req = urllib.request.Request(
        service + "/v1/chat/completions", data=chat, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req) as r:
        answer = json.load(r)["choices"][0]["message"]
    assert answer["role"] == "assistant" and answer["content"]


# ---------------------------------------------------------------------------------------------- train.py options
def test_train_options_point_llm_ranks_at_one_service_per_host():
    """--llm-endpoint reaches the agent's constructor; the launcher starts services only for the LLM agent with
    two or more trainers per host and no endpoint of the user's; bad combinations are one line."""
    from rudder.runtime import llm_service
    from rudder.runtime.config import TrainConfig

    cfg = TrainConfig(agent="llm", parts=2, trainers_per_part=2, llm_endpoint="http://127.0.0.1:9/v1")
    cfg.validate()
    assert cfg.agent_options() == {"endpoint": "http://127.0.0.1:9/v1"}
    assert not llm_service.wanted(cfg)  # the user's own endpoint
    assert llm_service.wanted(TrainConfig(agent="llm", parts=2, trainers_per_part=2))  # 4 trainers on this host
    assert llm_service.wanted(TrainConfig(agent="llm", parts=2))  # 2 trainers on this host
    assert not llm_service.wanted(TrainConfig(agent="llm", parts=2, llm_service="off"))
    assert not llm_service.wanted(TrainConfig(agent="periodic", parts=2, trainers_per_part=2))
    assert not llm_service.wanted(TrainConfig(agent="llm", hosts=2))  # one trainer on each emulated host
    assert llm_service.wanted(TrainConfig(agent="llm", hosts=2, trainers_per_part=2))
    with pytest.raises(ValueError, match="^--llm-endpoint is for --agent llm, got --agent periodic$"):
        TrainConfig(agent="periodic", llm_endpoint="http://127.0.0.1:9").validate()
    with pytest.raises(ValueError, match="expected an http:// or https:// URL"):
        TrainConfig(agent="llm", llm_endpoint="127.0.0.1:9").validate()
