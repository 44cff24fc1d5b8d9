"""An OpenAI-compatible HTTP server over the continuous-batching `Engine` (FastAPI + uvicorn).

    lm = load_lm("runs/code_lm")
    serve(lm, port=8000, slots=16)                  # blocks; SIGTERM drains and returns

Routes: `POST /v1/completions` (text or token-id prompts, `stream` as server-sent events),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). One thread
(`jaxnv.serve.runner.Runner`) owns the engine: it admits queued requests into free slots
between decode steps and hands each token to its request's asyncio queue. Requests go through
a bounded queue (full: 503 + Retry-After); bodies are size-limited (413); with an API key,
requests without it get 401. Every error is OpenAI's JSON:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from jaxnv.serve.api import CompletionRequest, choice_chunk, completion_body, parse_request, usage
from jaxnv.serve.engine import Engine, RequestError
from jaxnv.serve.runner import Job, Metrics, Runner

MAX_BODY_BYTES = 1 << 20
log = logging.getLogger("jaxnv.serve")


class APIError(Exception):
    """An HTTP error with OpenAI's JSON body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, self.status, headers=self.headers)


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def deliver(item):
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (index, item))

    return deliver


def make_app(engine: Engine, tokenizer, *, model_name: str = "jaxnv", api_key: str | None = None,
             max_queue: int = 256, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:  # fmt: skip
    """The FastAPI app; its lifespan starts and stops the engine thread (`app.state.runner`)."""
    metrics = Metrics()
    runner = Runner(engine, metrics, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="jaxnv", lifespan=lifespan)
    app.state.runner, app.state.metrics = runner, metrics
    created = int(time.time())

    def fail(e: APIError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        return e.response()

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return fail(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return fail(APIError(e.status_code, str(e.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        # the traceback goes to the server's log; the client learns nothing of the internals
        error_id = secrets.token_hex(6)
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path,
                  exc_info=e)  # fmt: skip
        return fail(APIError(500, f"internal server error (id {error_id}): see the server log",
                             "server_error"))  # fmt: skip

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health():
        if runner.failure is not None:
            return JSONResponse({"status": "error", "reason": runner.failure}, 503)
        return {"status": "ok", "active_slots": engine.active}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "jaxnv"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        metrics.requests.labels("200").inc()
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist: use {model_name!r}", param="model",
                           code="model_not_found")  # fmt: skip
        metrics.requests.labels("200").inc()
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await _read_body(request, max_body_bytes)
        try:
            req = parse_request(body)
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist: use {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if len(req.prompts()) > runner.max_queue:  # would be a 503 that never succeeds
            raise APIError(400, f"'prompt' holds {len(req.prompts())} prompts but the server "
                           f"queues at most {runner.max_queue}: split the request",
                           param="prompt")  # fmt: skip
        jobs, queue = _jobs(req, engine, tokenizer)
        if not runner.submit(jobs):
            raise APIError(503, "the server is at capacity: retry later", "server_overloaded",
                           headers={"Retry-After": "1"})  # fmt: skip
        metrics.requests.labels("200").inc()
        head = {"id": jobs[0].request_id.rsplit("-", 1)[0], "object": "text_completion",
                "created": int(time.time()), "model": model_name}  # fmt: skip
        if req.stream:
            return StreamingResponse(_stream(req, jobs, queue, runner, head),
                                     media_type="text/event-stream")  # fmt: skip
        return await _collect(req, jobs, queue, runner, request, head)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes, before or while reading it."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {size} bytes, over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over the {limit}-byte limit")
    return bytes(body)


def _jobs(req: CompletionRequest, engine: Engine, tokenizer) -> tuple[list[Job], asyncio.Queue]:
    """One job per prompt, checked by the engine (a RequestError is a 400)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    rid = secrets.token_hex(12)
    jobs = []
    for i, prompt in enumerate(req.prompts()):
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        room = engine.max_len - len(ids)
        sampling = req.sampling(default_max_tokens=max(1, min(16, room)))
        try:
            engine.check(ids, sampling)
        except RequestError as e:
            param = e.param if len(req.prompts()) == 1 or e.param != "prompt" else f"prompt[{i}]"
            raise APIError(400, str(e), param=param, code=e.code) from None
        jobs.append(Job(f"cmpl-{rid}-{i}", ids, sampling, _sink(loop, queue, i)))
    return jobs, queue


async def _events(jobs, queue, runner: Runner):
    """(index, Event) pairs until every job finished; cancels the unfinished ones on exit (a
    client that went away frees its slots at once)."""
    open_ = set(range(len(jobs)))
    try:
        while open_:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise APIError(500, "the engine failed: see the server log", "server_error")
            if item.finish_reason is not None:
                open_.discard(index)
            yield index, item
    finally:
        for i in open_:
            runner.cancel(jobs[i].request_id)


async def _collect(req, jobs, queue, runner, request: Request, head: dict) -> dict:
    texts, ids = [[] for _ in jobs], [[] for _ in jobs]
    reasons = [None] * len(jobs)
    events = _events(jobs, queue, runner)

    async def gather():
        async for index, event in events:
            texts[index].append(event.text)
            ids[index].append(event.token)
            reasons[index] = event.finish_reason

    task = asyncio.ensure_future(gather())
    try:
        while not task.done():  # a client that disconnects while it waits frees its slots
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        await task
    finally:
        await events.aclose()
    texts = ["".join(t) for t in texts]
    return completion_body(req, head, texts, ids, reasons, sum(len(j.ids) for j in jobs))


async def _stream(req, jobs, queue, runner, head: dict):
    """Server-sent events: one chunk per token with new text (and the finishing one), then
    [DONE]; a usage chunk first when `stream_options.include_usage`."""
    counts = [0] * len(jobs)
    events = _events(jobs, queue, runner)
    try:
        async for index, event in events:
            counts[index] += 1
            if event.text or event.finish_reason or req.return_token_ids:
                chunk = choice_chunk(req, head, index, event)
                yield f"data: {json.dumps(chunk)}\n\n"
        if req.include_usage():
            total = usage(sum(len(j.ids) for j in jobs), sum(counts))
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': total})}\n\n"
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': e.type}})}\n\n"
    finally:
        await events.aclose()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: an ephemeral one), bound before uvicorn starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port} ({e.strerror}): choose another --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, drain_timeout: float = 30.0):
    """A uvicorn server for `app`: on SIGTERM it stops accepting, lets the requests in flight
    finish (for at most `drain_timeout` s), then returns from `run`."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout,
                            lifespan="on", access_log=False)  # fmt: skip
    return uvicorn.Server(config)


def serve(lm, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8,
          max_len: int | None = None, api_key: str | None = None, model_name: str | None = None,
          max_queue: int = 256, drain_timeout: float = 30.0, log=print) -> int:  # fmt: skip
    """Serve a loaded `LanguageModel` until SIGTERM/SIGINT: compile first, then bind, say where
    it listens (one line), drain on the signal; returns 0."""
    import signal

    engine = Engine(lm.graphdef, lm.params, lm.model_state, slots=slots, max_len=max_len,
                    eos_id=lm.tokenizer.eos_id, detokenize=lm.tokenizer.decode)  # fmt: skip
    start = time.perf_counter()
    engine.compile()
    compiled = time.perf_counter() - start
    name = model_name or lm.name
    app = make_app(engine, lm.tokenizer, model_name=name, api_key=api_key, max_queue=max_queue)
    sock = bind(host, port)
    where = (
        f"{host}:{sock.getsockname()[1]}"
        if ":" not in host
        else f"[{host}]:{sock.getsockname()[1]}"
    )
    what = f"{engine.slots} slots, max len {engine.max_len}, compiled in {compiled:.1f}s"
    log(f"jaxnv serve: listening on http://{where} (model {name!r} from {lm.source}, {what})")
    # uvicorn re-raises the signal it caught once it has drained; a no-op handler turns that
    # into a normal return (exit 0) instead of death by SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        make_server(app, drain_timeout).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` on a background thread (tests, benchmarks); returns (server, thread, base
    url). Stop it with `server.should_exit = True; thread.join()`."""
    sock = bind(host, port)
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return server, thread, f"http://{host}:{sock.getsockname()[1]}"
