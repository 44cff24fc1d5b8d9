"""The OpenAI-compatible server, in process on 127.0.0.1 (uvicorn on a thread): the official
`openai` client (completions, streaming, errors), 64 concurrent requests each equal to offline
`generate`, OpenAI-style 4xx errors after which it still serves, backpressure, API keys,
disconnects that free their slot, Prometheus metrics; and `jaxnv serve` draining on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from jaxnv.data.tokenizers import train_bpe
from jaxnv.hf import save
from jaxnv.models.generate import generate
from jaxnv.models.transformer import Transformer
from jaxnv.serve.engine import Engine
from jaxnv.serve.loading import load_lm
from jaxnv.serve.server import make_app, start_in_thread

openai = pytest.importorskip("openai")

KEY, NAME, MAX_LEN = "test-key", "tiny", 64
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 4, "def add(x, y):\n    return x + y\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama-style model with a byte-level BPE, as a Hugging Face directory."""
    tok = train_bpe(TEXTS, 300)
    model = Transformer(tok.vocab_size, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64,
                        max_seq_len=MAX_LEN, rngs=nnx.Rngs(0))  # fmt: skip
    return save(model, tmp_path_factory.mktemp("hf") / NAME, tokenizer=tok.tok)


@pytest.fixture(scope="module")
def server(model_dir):
    lm = load_lm(str(model_dir))
    engine = Engine(lm.graphdef, lm.params, lm.model_state, slots=8, max_len=MAX_LEN,
                    eos_id=lm.tokenizer.eos_id, detokenize=lm.tokenizer.decode)  # fmt: skip
    engine.compile()
    app = make_app(engine, lm.tokenizer, model_name=NAME, api_key=KEY, max_body_bytes=4096)
    uv, thread, url = start_in_thread(app)
    yield lm, app, url
    uv.should_exit = True
    thread.join(30)


def _client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _greedy(lm, prompts, n):
    """Offline `generate` for token-id prompts: the reference for the served tokens."""
    return [list(map(int, r)) for r in generate(
        lm.graphdef, lm.params, prompts, n, temperature=0.0, model_state=lm.model_state,
        stop_ids=(lm.tokenizer.eos_id,))]  # fmt: skip


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_openai_client_completions_streaming_and_errors(server):
    lm, _, url = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "the quick brown"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})  # fmt: skip
    ids = out.choices[0].model_extra["token_ids"]
    (want,) = _greedy(lm, [lm.tokenizer.encode(prompt)], 12)
    assert ids == want
    assert out.choices[0].text == lm.tokenizer.decode([i for i in ids if i != lm.tokenizer.eos_id])
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == len(ids) and out.object == "text_completion"
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True))  # fmt: skip
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    # token-id prompts, two at once, with a stop string cut from the text
    stop = out.choices[0].text[4:7]
    pair = [[5, 6, 7], [8, 9]]
    two = client.completions.create(model=NAME, prompt=pair, max_tokens=5, temperature=0,
                                    extra_body={"return_token_ids": True})  # fmt: skip
    assert [c.model_extra["token_ids"] for c in two.choices] == _greedy(lm, pair, 5)
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                    stop=[stop])  # fmt: skip
    assert cut.choices[0].text == out.choices[0].text[: out.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        _client(url, key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(
            model=NAME, prompt="hi", max_tokens=2, temperature=-1, stream=True
        )


def test_64_concurrent_requests_each_equal_offline_generate(server):
    lm, app, url = server
    rng = np.random.default_rng(0)
    lengths = (2, 7, 13)
    prompts = [rng.integers(1, 250, int(rng.integers(1, 40))).tolist() for _ in range(64)]
    budget = [lengths[i % 3] for i in range(64)]
    before = _metrics(url)

    def ask(i):
        body = {"model": NAME, "prompt": prompts[i], "max_tokens": budget[i], "temperature": 0,
                "return_token_ids": True, "stream": i % 4 == 0}  # fmt: skip
        headers = {"Authorization": f"Bearer {KEY}"}
        if not body["stream"]:
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["id"], r.json()["choices"][0]["token_ids"]
        ids, rid = [], None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                          timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    rid = chunk["id"]
                    ids += chunk["choices"][0]["token_ids"]
        return rid, ids

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(ask, range(64), timeout=300))
    assert len({rid for rid, _ in results}) == 64  # none lost, none answered twice
    for n in lengths:
        idx = [i for i in range(64) if budget[i] == n]
        want = _greedy(lm, [prompts[i] for i in idx], n)
        assert [results[i][1] for i in idx] == want
    after = _metrics(url)
    served = sum(len(ids) for _, ids in results)
    assert (
        after["jaxnv_generated_tokens_total{}"] - before["jaxnv_generated_tokens_total{}"] == served
    )
    assert after["jaxnv_time_to_first_token_seconds_count{}"] >= 64
    assert (
        after['jaxnv_requests_total{"status": "200"}']
        - before['jaxnv_requests_total{"status": "200"}']
        >= 64
    )
    assert after["jaxnv_active_slots{}"] == 0 and after["jaxnv_queue_depth{}"] == 0


BAD = {
    "malformed JSON": (b'{"prompt": "hi",', {}, 400, None),
    "missing prompt": (b'{"max_tokens": 3}', {}, 400, "prompt"),
    "prompt over the context": (json.dumps({"prompt": [1] * MAX_LEN}).encode(), {}, 400, "prompt"),
    "max_tokens 0": (b'{"prompt": "hi", "max_tokens": 0}', {}, 400, "max_tokens"),
    "max_tokens over the limit": (b'{"prompt": "hi", "max_tokens": 999}', {}, 400, "max_tokens"),
    "negative temperature": (b'{"prompt": "hi", "temperature": -0.1}', {}, 400, "temperature"),
    "unknown model": (b'{"prompt": "hi", "model": "gpt-x"}', {}, 404, "model"),
    "oversized body": (json.dumps({"prompt": "x" * 5000}).encode(), {}, 413, None),
    "wrong API key": (b'{"prompt": "hi"}', {"Authorization": "Bearer nope"}, 401, None),
    "no API key": (b'{"prompt": "hi"}', {"Authorization": ""}, 401, None),
    "unsupported n": (b'{"prompt": "hi", "n": 2}', {}, 400, "n"),
    "five stop strings": (
        json.dumps({"prompt": "hi", "stop": list("abcde")}).encode(),
        {},
        400,
        "stop",
    ),
    "a stop over 256 characters": (
        json.dumps({"prompt": "hi", "stop": "ab" * 129}).encode(),
        {},
        400,
        "stop",
    ),
    "33 prompts": (json.dumps({"prompt": [[1]] * 33}).encode(), {}, 400, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server, case):
    _, _, url = server
    body, headers, status, param = BAD[case]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    r = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["message"] and "\n" not in error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    ok = _client(url).completions.create(model=NAME, prompt="the", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_a_full_queue_answers_503_with_retry_after(server, monkeypatch):
    _, app, url = server
    runner = app.state.runner
    monkeypatch.setattr(runner, "submit", lambda jobs: False)  # no room left now
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "server_overloaded"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # no key needed


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_503(server, monkeypatch):
    _, app, url = server
    monkeypatch.setattr(app.state.runner, "max_queue", 2)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [[1], [2], [3]]},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and "at most 2" in r.json()["error"]["message"]


def test_an_internal_error_is_logged_and_not_shown_to_the_client(server, monkeypatch, caplog):
    lm, _, url = server

    def broken(text):
        raise RuntimeError("secret-internal-detail")

    monkeypatch.setattr(lm.tokenizer, "encode", broken)
    with caplog.at_level("ERROR", logger="jaxnv.serve"):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"},
                       headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "server log" in error["message"]
    assert "secret" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rec.name == "jaxnv.serve"]
    assert logged and logged[0].exc_info[1].args == ("secret-internal-detail",)


def test_health_answers_503_after_an_engine_failure(server, monkeypatch, caplog):
    _, app, url = server
    runner = app.state.runner

    def broken(*args):
        raise RuntimeError("secret-device-detail")

    monkeypatch.setattr(runner.engine, "insert", broken)
    try:
        with caplog.at_level("ERROR", logger="jaxnv.serve"):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"},
                           headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 500 and "secret" not in r.text
        assert any(rec.exc_info for rec in caplog.records if rec.name == "jaxnv.serve")
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "error"
        assert "engine failed" in health.json()["reason"] and "secret" not in health.text
    finally:
        runner.failure = None  # the module's server serves the other tests


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    _, app, url = server
    engine = app.state.runner.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # 50 tokens/s
    before = _metrics(url)["jaxnv_generated_tokens_total{}"]
    body = {"model": NAME, "prompt": "the", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        next(r.iter_lines())  # the first token arrived: its slot is decoding; now hang up
    # and a non-streaming client that goes away while it waits
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        payload = json.dumps({**body, "stream": False}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                  + str(len(payload)).encode() + b"\r\n\r\n" + payload)  # fmt: skip
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    after = _metrics(url)
    assert after["jaxnv_active_slots{}"] == 0
    assert after["jaxnv_generated_tokens_total{}"] - before < 2 * 60 / 2  # cut well short


@pytest.mark.slow
def test_jaxnv_serve_drains_on_sigterm_and_exits_0(model_dir, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SERVE_KEY": KEY}
    cmd = [sys.executable, "-m", "jaxnv.cli", "serve", str(model_dir), "--port", "0",
           "--slots", "2", "--api-key-env", "SERVE_KEY", "--drain-timeout", "60"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stdout.read()
        url = line.split("listening on ")[1].split()[0]
        results, started = {}, [threading.Event() for _ in range(6)]

        def stream(i):  # 6 long requests on 2 slots: most still queued or decoding at SIGTERM
            body = {"model": NAME, "prompt": [i + 1], "max_tokens": 60, "temperature": 0,
                    "stream": True, "return_token_ids": True}  # fmt: skip
            ids, done = [], False
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
                started[i].set()  # its headers came: it was admitted to the queue
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        ids += json.loads(line[6:])["choices"][0]["token_ids"]
            results[i] = (ids, done)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lm = load_lm(str(model_dir))
    want = _greedy(lm, [[i + 1] for i in range(6)], 60)
    assert [results[i] for i in range(6)] == [(w, True) for w in want]
    with pytest.raises(httpx.ConnectError):  # it no longer listens
        httpx.get(f"{url}/health")


def test_cli_refuses_an_unset_api_key_variable(capsys):
    from jaxnv import cli

    code = cli.main(["serve", "nowhere", "--api-key-env", "JAXNV_TEST_UNSET_KEY"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "JAXNV_TEST_UNSET_KEY" in err and len(err.splitlines()) == 1


def test_cli_refuses_a_busy_port_in_one_line(model_dir, capsys, monkeypatch):
    from jaxnv import cli

    monkeypatch.setenv("JAXNV_COMPILATION_CACHE", "off")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["serve", str(model_dir), "--port", str(port), "--slots", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.splitlines()) == 1, err


def test_cli_warns_when_it_listens_beyond_loopback_without_a_key(capsys, monkeypatch):
    from jaxnv import cli

    monkeypatch.setenv("JAXNV_COMPILATION_CACHE", "off")
    assert cli.main(["serve", "nowhere", "--host", "0.0.0.0"]) == 2  # then "nowhere" is refused
    err = capsys.readouterr().err.splitlines()
    assert "anyone who can reach port 8000 can use the model" in err[0]
    assert "--api-key-env" in err[0] and len(err) == 2
    for host in ("127.0.0.1", "localhost", "::1"):
        assert cli.main(["serve", "nowhere", "--host", host]) == 2
        assert "warning" not in capsys.readouterr().err


def test_cli_without_the_serve_extra_says_how_to_install_it(capsys, monkeypatch):
    from jaxnv import cli

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn: ImportError
    assert cli.main(["serve", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "jaxnv: error: jaxnv serve needs the serve extra: pip install 'jaxnv[serve]'"
