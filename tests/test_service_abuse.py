"""The LLM decision service under abuse (issue 30): no request can kill it, slow it for others or reach it without the
job's token. Each test sends what a careless or hostile client on a shared node would, to rudder's service on a tiny
random Llama (built here, served in this process on a loopback port), and checks the answer, the time it took and
the service's state after: oversized bodies and prompts, malformed requests of every kind, idle and half-sent
connections, many connections at once, a client hanging up on a long generation, scoring beside a long generation,
and the bearer token end to end through the launcher's :class:`~rudder.runtime.llm_service.Services`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from rudder.agents.llm import models as llm_models  # noqa: E402
from rudder.agents.llm.client import EndpointClient, EndpointError  # noqa: E402
from rudder.agents.llm.server import (  # noqa: E402
    LISTEN_BACKLOG,
    Batcher,
    Engine,
    Limits,
    RequestError,
    Service,
    TokenGate,
    serve,
)
from test_llm import make_tiny_model  # noqa: E402

TOKEN = "job-token-for-tests"
CONTEXT = 512  # the tiny engine's context here, so that prompts past it are cheap to build
MAX_CONNECTIONS = 12
IDLE_S = 1.0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    model, tokenizer, _ = llm_models.load_model(tiny_folder)
    return model, tokenizer


@pytest.fixture(scope="module")
def served(tiny):
    """The tiny model served with a token, a 512-token context, 12 connections at most and a 1 s idle timeout."""
    engine = Engine(*tiny, "tiny", context_tokens=CONTEXT, prefix_tokens=400)
    service = Service(engine, Batcher(engine, window_s=0.002, prefill_chunk=64), token=TOKEN, max_request_tokens=2048)
    server = serve(service, limits=Limits(idle_timeout_s=IDLE_S, read_timeout_s=2.0, max_connections=MAX_CONNECTIONS))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, service, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def port_of(served) -> int:
    return served[0].server_address[1]


def exchange(port: int, data: bytes, timeout: float = 5.0, then=None) -> tuple[int, dict, dict, float]:
    """Send ``data`` raw (then call ``then(sock)``, e.g. to stream a body), read one answer: status, headers, JSON
    body, seconds until the status line arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        t0 = time.perf_counter()
        sock.sendall(data)
        if then is not None:
            threading.Thread(target=then, args=(sock,), daemon=True).start()
        f = sock.makefile("rb")
        status_line = f.readline()
        took = time.perf_counter() - t0
        assert status_line, "the connection closed without an answer"
        status = int(status_line.split()[1])
        headers = {}
        while (line := f.readline().strip()) != b"":
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = f.read(int(headers.get("content-length", 0)))
        return status, headers, json.loads(body) if body else {}, took


def post(path: str, body, token: str | None = TOKEN, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n{extra}"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


def call(url: str, body: dict, path: str = "/v1/completions", token: str = TOKEN) -> dict:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def stats(url: str) -> dict:
    req = urllib.request.Request(url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def one_line_error(status: int, body: dict, expected: int) -> str:
    assert status == expected, (status, body)
    message = body["error"]["message"]
    assert message and "\n" not in message and body["error"]["type"]
    return message


# ---------------------------------------------------------------------------------------------- bodies and prompts
def test_a_5mb_body_is_refused_in_under_a_second_unread(served):
    """413 with one line naming the limit, before the body is read (the answer arrives while it is still being
    sent); the service then serves the next request."""
    port = port_of(served)
    size = 5 << 20
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()

    def stream(sock):
        try:
            for _ in range(size // 65536):
                sock.sendall(b"x" * 65536)
        except OSError:
            pass  # refused: the service closed its side

    status, headers, body, took = exchange(port, head, then=stream)
    message = one_line_error(status, body, 413)
    assert message == f"the body is {size} bytes: at most {1 << 20} (--max-body-bytes)" and took < 1.0
    assert headers["connection"] == "close"
    got = call(served[2], dict(prompt="hit rate", max_tokens=0, echo=True, logprobs=0))
    assert got["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_prompts_are_checked_against_the_context_and_max_tokens_capped(served):
    """A prompt past the model's context is 400 naming both lengths; max_tokens beyond what the prompt leaves of
    the context is capped (the answer stays inside the context), not run past it."""
    _, service, url = served
    port = port_of(served)
    long_text = "hit rate traffic rows " * 200
    n = len(service.engine.encode(long_text))
    assert n > CONTEXT
    status, _, body, _ = exchange(port, post("/v1/completions", dict(prompt=long_text, max_tokens=0, echo=True)))
    assert one_line_error(status, body, 400) == f"prompt 0 is {n} tokens: the model's context is {CONTEXT} tokens"
    near = service.engine.tokenizer.decode(service.engine.encode(long_text)[: CONTEXT - 6])
    m = len(service.engine.encode(near))
    assert CONTEXT - 16 < m < CONTEXT, m  # leaves a few tokens
    got = call(url, dict(prompt=near, max_tokens=10**9, temperature=0))
    usage = got["usage"]
    assert usage["prompt_tokens"] == m and 1 <= usage["completion_tokens"] <= CONTEXT - m
    assert usage["total_tokens"] <= CONTEXT
    # a prompt filling the context leaves no room to generate: 400, not a run past the context
    full = service.engine.tokenizer.decode(service.engine.encode(long_text)[:CONTEXT])
    k = len(service.engine.encode(full))
    if k == CONTEXT:
        status, _, body, _ = exchange(port, post("/v1/completions", dict(prompt=full, max_tokens=5)))
        assert "no room to generate" in one_line_error(status, body, 400)
    # too many prompts, or too many tokens in one request
    status, _, body, _ = exchange(port, post("/v1/completions", dict(prompt=["a"] * 65, max_tokens=0, echo=True)))
    assert one_line_error(status, body, 400) == "'prompt' holds 65 prompts: at most 64"
    status, _, body, _ = exchange(port, post("/v1/completions", dict(prompt=[near] * 8, max_tokens=0, echo=True)))
    assert one_line_error(status, body, 400).endswith("tokens: at most 2048 in one request")


def test_rows_past_the_token_budget_are_scored_in_chunks_exactly(tiny):
    """Rows longer than the token budget (a prompt near the context) are prefilled in chunks on their own cache
    (bounded memory): their echo equals one plain forward pass, with or without a kept prefix, top alternatives
    included, and their shared part is kept for later."""
    from test_llm_server import plain_logprobs

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, "tiny", prefix_entries=4, min_prefix=8, token_budget=16)
    enc = engine.encode
    a = enc("hit rate traffic rows buffer minibatch decision remote rows " * 4)
    rows = [a + enc(' {"decision": "keep"}'), a + enc(' {"decision": "replace"} stale candidates')]
    assert min(map(len, rows)) > 3 * 16
    first = engine.score([rows], top_n=2)
    assert len(engine._entries) == 1 and len(next(iter(engine._entries))) >= len(a) - 1
    passes = engine.forward_passes
    later = engine.score([[a + enc(" sampled fetched prefetched stale candidates hit rate traffic rows")]], top_n=2)
    assert engine.forward_passes - passes <= 2  # only the part past the kept prefix: a chunk or two of 16
    for got, row in zip(
        first[0] + later[0], rows + [a + enc(" sampled fetched prefetched stale candidates hit rate traffic rows")]
    ):
        assert got.tokens == row and got.token_logprobs[0] is None and len(got.top) == len(row)
        np.testing.assert_allclose(got.token_logprobs[1:], plain_logprobs(model, row), atol=1e-4)
        assert all(max(lp for _, lp in t) >= x - 1e-6 for t, x in zip(got.top[1:], got.token_logprobs[1:]))


def test_one_batch_of_many_trainers_copies_one_prefix_and_keeps_trainers_prefixes(tiny):
    """Fifty trainers warming up at once send the same prefix: it is computed and its KV cache copied once (fifty
    copies took 6 GB with the real model). Decisions' own prompts, which extend a trainer's prefix, are dropped
    before the trainers' prefixes when the kept tokens run over."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, "tiny", prefix_entries=8, prefix_tokens=260, min_prefix=8)
    prefixes = [engine.encode(f"rank {r} hit rate traffic rows buffer minibatch decision " * 4) for r in range(2)]
    got = engine.score([[prefixes[0]]] * 50)
    assert engine.forward_passes == 1 and len(engine._entries) == 1 and all(g[0] is got[0][0] for g in got)
    engine.score([[prefixes[1]]])
    for d in range(4):  # decisions of trainer 0: each keeps its own prompt, extending the prefix, until over budget
        prompt = prefixes[0] + engine.encode(f" decision {d} remote rows sampled fetched")
        engine.score([[prompt + engine.encode(' {"decision": "keep"}'), prompt + engine.encode(' {"decision": "no"}')]])
        assert tuple(prefixes[0]) in engine._entries and tuple(prefixes[1]) in engine._entries
        assert sum(map(len, engine._entries)) <= 260
    engine.prefix_tokens = 10_000  # now the entry count binds: six trainers' decisions in one batch, 4 entries kept
    engine.prefix_entries = 4
    batch = []
    for d in range(6):
        prompt = prefixes[d % 2] + engine.encode(f" decision {d} hit rate {d}")
        batch.append([prompt + engine.encode(' {"decision": "keep"}'), prompt + engine.encode(' {"decision": "no"}')])
    engine.score(batch)
    assert len(engine._entries) == 4
    assert tuple(prefixes[0]) in engine._entries and tuple(prefixes[1]) in engine._entries


def test_kept_prefixes_and_queued_tokens_are_bounded(tiny):
    """Memory a client can make the service hold: kept prefixes stay within ``prefix_tokens`` whatever prompts
    come; the prompt tokens in flight stay within the gate's limit (past it a request waits, then gets 503)."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, "tiny", prefix_entries=100, prefix_tokens=300, min_prefix=8)
    for i in range(12):  # 12 distinct ~130-token prompts, each kept as a prefix if it could be
        engine.score([[engine.encode(f"{i} hit rate traffic rows buffer minibatch {i} " * 12)]])
        assert sum(map(len, engine._entries)) <= 300
    assert 1 <= len(engine._entries) <= 3
    gate = TokenGate(100, wait_s=0.2)
    with gate.hold(80):
        t0 = time.perf_counter()
        with pytest.raises(RequestError, match=r"^busy: 80 prompt tokens queued \(at most 100\); try again$") as err:
            with gate.hold(30):
                pass
        assert err.value.status == 503 and 0.15 < time.perf_counter() - t0 < 2.0
        with gate.hold(20):
            assert gate.used == 100
    with gate.hold(500):  # one request larger than the limit alone still runs, alone
        assert gate.used == 500
    assert gate.used == 0


# ---------------------------------------------------------------------------------------------- client mistakes
BAD = [
    (b"{not json", 400, "the body is not JSON"),
    (b'{"prompt": "caf\xe9"}', 400, "the body is not UTF-8"),
    (b'{"prompt": "\\ud800 hit", "max_tokens": 0, "echo": true}', 400, "lone surrogate"),
    (dict(prompt="a", seed="x"), 400, "'seed' must be an integer, got \"x\""),
    (b'{"prompt": "a", "temperature": NaN}', 400, "NaN, which JSON does not allow"),
    (b'{"prompt": "a", "temperature": Infinity}', 400, "Infinity, which JSON does not allow"),
    (dict(prompt="a", temperature=True), 400, "'temperature' must be a number, got true"),
    (dict(prompt="a", max_tokens="5"), 400, "'max_tokens' must be an integer"),
    (dict(prompt="a", max_tokens=-1), 400, "'max_tokens' must be in"),
    (dict(prompt="a", logprobs=1.5), 400, "'logprobs' must be an integer"),
    (dict(prompt="a", echo="yes"), 400, "'echo' must be a boolean"),
    (dict(prompt="a", seed=1 << 70), 400, "'seed' must be in"),
    (dict(prompt="a", stream=True), 400, "'stream' true is not supported"),
    (dict(prompt="a", top_p="x"), 400, "'top_p' \"x\" is not supported"),
    (dict(prompt="a", stop=5), 400, "'stop' 5 is not supported"),
    (dict(prompt="a", user=5), 400, "'user' must be a string"),
    (dict(prompt="a", n=2), 400, "'n' 2 is not supported"),
    (dict(prompt="a", model=5), 400, "'model' must be a string"),
    (dict(prompt="a", model="gpt-17"), 404, "The model 'gpt-17' does not exist"),
    (dict(prompt=[1, 2]), 400, "'prompt' must be a string or a non-empty list of strings"),
    (dict(prompt=""), 400, "prompt 0 is empty"),
    (b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    (b"[1, 2]", 400, "the body must be a JSON object, got list"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_client_mistakes_get_4xx_json_in_one_line(served, body, status, message):
    got, headers, answer, _ = exchange(port_of(served), post("/v1/completions", body))
    assert message in one_line_error(got, answer, status)
    assert headers["content-type"] == "application/json"


def test_chat_mistakes_methods_and_headers_get_4xx_json(served):
    """Chat messages of the wrong shape, other methods than GET/POST (405 JSON naming both), a malformed
    Content-Length (400 at once, not a hang), a chunked body (411), an unknown method (JSON, not HTML)."""
    port = port_of(served)
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": 5}], "hi"):
        status, _, body, _ = exchange(port, post("/v1/chat/completions", dict(messages=messages)))
        assert "'messages' must be a list of 1 to 64 objects" in one_line_error(status, body, 400)
    for method in ("PUT", "DELETE", "PATCH"):
        req = f"{method} /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        status, headers, body, _ = exchange(port, req)
        assert (
            one_line_error(status, body, 405) == f"method {method} is not allowed on /v1/completions: use GET or POST"
        )
        assert headers["allow"] == "GET, POST"
    for length, expected in (("-1", 400), ("abc", 400), ("+5", 400), ("1e3", 400)):
        req = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
        status, _, body, took = exchange(port, req, timeout=3)
        assert (
            one_line_error(status, body, expected) == f"Content-Length must be a non-negative integer, got {length!r}"
        )
        assert took < 1.0
    req = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    status, _, body, _ = exchange(port, req)
    assert "Content-Length" in one_line_error(status, body, 411)
    status, headers, body, _ = exchange(port, b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 501 and headers["content-type"] == "application/json" and body["error"]["message"]


# ---------------------------------------------------------------------------------------------- connections
def test_the_listen_backlog_queues_fifty_connections_before_any_is_accepted(tiny):
    """Fifty trainers connecting at the same moment all get connected, even before the service accepts any (a
    backlog of 5 dropped the rest)."""
    engine = Engine(*tiny, "tiny")
    server = serve(Service(engine, Batcher(engine)), limits=Limits())
    assert server.request_queue_size == LISTEN_BACKLOG >= 64
    socks = []
    try:
        for _ in range(50):  # nothing accepts them yet: they wait in the listen queue
            s = socket.socket()
            s.settimeout(2.0)
            s.connect(server.server_address)
            socks.append(s)
        assert len(socks) == 50
    finally:
        for s in socks:
            s.close()
        server.server_close()


def test_idle_and_half_sent_connections_are_closed(served):
    """A connection that sends nothing, or half a request line, or a body that stops, is closed after the idle
    timeout (1 s here) instead of holding a thread forever."""
    port = port_of(served)
    for data in (b"", b"POST /v1/completions HTT"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            t0 = time.perf_counter()
            assert sock.recv(65536) == b"" or sock.recv(65536) == b""  # closed (an error answer may come first)
            assert IDLE_S * 0.8 < time.perf_counter() - t0 < IDLE_S + 3
    head = post("/v1/completions", b'{"prompt": "hit rate", "max_tokens": 0, "echo": true}')
    status, _, body, took = exchange(port, head[:-10])  # the body's last 10 bytes never come
    assert one_line_error(status, body, 408).startswith("the body stopped arriving") and took < IDLE_S + 3


def test_threads_stay_bounded_and_extra_connections_get_503(served):
    """Idle connections past --max-connections get 503 at once (one line, Retry-After) instead of a thread each;
    the thread count stays bounded while they are open, and the service answers again once they close."""
    base = threading.active_count()
    socks = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):
            socks.append(socket.create_connection(("127.0.0.1", port_of(served)), timeout=5))
        time.sleep(0.3)
        assert threading.active_count() <= base + MAX_CONNECTIONS
        answer = socks[-1].recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"] == (
            "busy: all connections in use; try again"
        )
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the handler threads see their connections closed and end
        try:
            assert stats(served[2])["refused_connections"] >= 2 * MAX_CONNECTIONS
            break
        except (urllib.error.HTTPError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_fifty_concurrent_clients_all_get_answers(served):
    """Fifty clients asking at once, more than --max-connections (12 here): every one gets its scores, those
    turned away retrying with backoff; the answers equal one asked alone."""
    url = served[2]
    clients = [EndpointClient(url, api_key=TOKEN, attempts=12, backoff_s=0.05) for _ in range(50)]
    alone = clients[0].echo_logprobs(["hit rate traffic rows", "remote rows"])
    got: list = [None] * 50
    errors: list = []

    def ask(i):
        try:
            got[i] = clients[i].echo_logprobs(["hit rate traffic rows", "remote rows"])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    for g in got:
        for a, b in zip(alone, g):
            np.testing.assert_allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], atol=1e-5)


# ---------------------------------------------------------------------------------------------- scheduling
def test_scoring_is_not_queued_behind_a_long_generation(served):
    """A decision asked while a long generation runs is answered within a fraction of a second, before the
    generation ends (it waited the whole generation before)."""
    url = served[2]
    call(url, dict(prompt="hit rate traffic", max_tokens=0, echo=True, logprobs=0))  # warm
    t0 = time.perf_counter()
    call(url, dict(prompt="remote rows sampled", max_tokens=0, echo=True, logprobs=0))
    idle = time.perf_counter() - t0
    done = {}

    def generate():
        got = call(url, dict(prompt="hit rate", max_tokens=400, temperature=0, seed=1))
        done["at"], done["tokens"] = time.perf_counter(), got["usage"]["completion_tokens"]

    before = stats(url)["generation_steps"]
    gen = threading.Thread(target=generate)
    gen.start()
    while stats(url)["generation_steps"] < before + 5:
        time.sleep(0.02)
    t0 = time.perf_counter()
    got = call(url, dict(prompt="remote rows sampled", max_tokens=0, echo=True, logprobs=0))
    busy, scored_at = time.perf_counter() - t0, time.perf_counter()
    gen.join(120)
    assert got["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert done["tokens"] > 100 and scored_at < done["at"], done
    assert busy < max(0.5, 10 * idle), (busy, idle)


def test_chunked_prefill_generates_what_one_prefill_does(tiny):
    """Generation in steps (prefill chunks of 7 tokens) gives the tokens and log-probabilities of one prefill."""
    engine = Engine(*tiny, "tiny")
    row = engine.encode("hit rate traffic rows buffer minibatch decision " * 4)
    whole = engine.generation(row, 20, prefill_chunk=10000)
    steps = engine.generation(row, 20, prefill_chunk=7)
    outs = []
    for gen in (whole, steps):
        n = 0
        while True:
            try:
                next(gen)
                n += 1
            except StopIteration as done:
                outs.append((n, done.value))
                break
    (n1, a), (n2, b) = outs
    assert n2 == n1 + (len(row) + 6) // 7 - 1 and a[0] == b[0] and a[3] == b[3]
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_a_client_that_hangs_up_is_cancelled_quietly(served, capfd):
    """A client that asks for a long generation and hangs up: its work stops within a step or two (not computed to
    the end) and nothing is written to the log (no BrokenPipe traceback)."""
    url = served[2]
    before = stats(url)
    with socket.create_connection(("127.0.0.1", port_of(served))) as sock:
        sock.sendall(post("/v1/completions", dict(prompt="hit rate", max_tokens=400, temperature=0)))
        deadline = time.monotonic() + 30
        while stats(url)["generation_steps"] < before["generation_steps"] + 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 5
    while stats(url)["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
        time.sleep(0.05)
    steps = stats(url)["generation_steps"]
    time.sleep(0.5)
    after = stats(url)
    assert after["generation_steps"] == steps < before["generation_steps"] + 300  # stopped, long before 400 tokens
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "BrokenPipe" not in err and "rudder-llm: error" not in err


# ---------------------------------------------------------------------------------------------- access
def test_requests_without_the_token_get_401(served, monkeypatch):
    """No token, a wrong one or another scheme: 401 JSON with WWW-Authenticate, before the body is read; the
    client sends $RUDDER_LLM_TOKEN, else $OPENAI_API_KEY, and says which is missing when refused."""
    port, url = port_of(served), served[2]
    for header in ("", "Authorization: Bearer wrong\r\n", f"Authorization: Basic {TOKEN}\r\n"):
        req = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()
        status, headers, body, _ = exchange(port, req)
        assert "missing or wrong bearer token" in one_line_error(status, body, 401)
        assert headers["www-authenticate"] == "Bearer"
    status, _, body, _ = exchange(port, post("/v1/completions", dict(prompt="a"), token=None))
    one_line_error(status, body, 401)
    for var in ("RUDDER_LLM_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(EndpointError, match=r"HTTP 401: missing or wrong bearer token.*\(token sent: none; set "):
        EndpointClient(url)
    monkeypatch.setenv("OPENAI_API_KEY", TOKEN)
    assert EndpointClient(url).model == "tiny"
    monkeypatch.setenv("RUDDER_LLM_TOKEN", "stale")  # the job's own variable comes first
    with pytest.raises(EndpointError, match=r"HTTP 401: .*\(token sent: yes"):
        EndpointClient(url)


def test_the_launcher_gives_its_service_and_ranks_one_fresh_token(tiny_folder):
    """Services (what train.py --llm-service auto runs) starts the service with a fresh token per job and hands the
    ranks the same one: a request without it is refused, a client with the ranks' environment is served."""
    from rudder.runtime.llm_service import Services

    with Services(str(tiny_folder), priority="normal", note=lambda line: None) as services:
        assert services.rank_env() == {}  # nothing started: nothing to hand
        url = services.start_here()
        env = services.rank_env()
        assert set(env) == {"RUDDER_LLM_TOKEN"} and len(env["RUDDER_LLM_TOKEN"]) >= 32
        assert Services(str(tiny_folder)).token != services.token
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/v1/models", timeout=10)
        assert err.value.code == 401
        assert EndpointClient(url, api_key=env["RUDDER_LLM_TOKEN"]).model


# ---------------------------------------------------------------------------------------------- client retries
class Flaky(BaseHTTPRequestHandler):
    """Resets the first ``resets`` connections, answers 503 to the next ``busy``, then serves /v1/models."""

    resets = busy = 0
    seen = 0

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        Flaky.seen += 1
        if Flaky.seen <= Flaky.resets:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            self.connection.close()
            return
        status, data = (
            (503, b'{"error": {"message": "busy"}}')
            if Flaky.seen <= Flaky.resets + Flaky.busy
            else (200, b'{"data": [{"id": "m"}]}')
        )
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Flaky.seen = 0
    yield server
    server.shutdown()
    server.server_close()


def test_the_client_retries_resets_and_503_with_backoff_then_names_the_url(flaky):
    url = f"http://127.0.0.1:{flaky.server_address[1]}"
    Flaky.resets, Flaky.busy = 2, 2
    t0 = time.perf_counter()
    client = EndpointClient(url, attempts=6, backoff_s=0.05)
    assert client.model == "m" and client.retries == 4 and Flaky.seen == 5
    assert 0.05 < time.perf_counter() - t0 < 5
    Flaky.seen, Flaky.resets, Flaky.busy = 0, 0, 100
    with pytest.raises(EndpointError, match=rf"^LLM endpoint {url}/v1/models: HTTP 503: busy \(3 attempts\)$"):
        EndpointClient(url, attempts=3, backoff_s=0.01)
    assert Flaky.seen == 3
