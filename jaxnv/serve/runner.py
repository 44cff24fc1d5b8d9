"""The engine's thread: admits queued requests into free slots between decode steps, hands each
token to its request, keeps the Prometheus instruments. The only place the engine is driven from.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxnv.serve.engine import Engine, Event, SamplingParams

log = logging.getLogger("jaxnv.serve")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's Prometheus instruments, in a registry of its own."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxnv_requests", "HTTP requests by status", ["status"], registry=r)
        self.tokens = Counter("jaxnv_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("jaxnv_queue_depth", "requests waiting for a slot", registry=r)
        self.active_slots = Gauge("jaxnv_active_slots", "slots decoding a request", registry=r)
        self.ttft = Histogram("jaxnv_time_to_first_token_seconds", "submit to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("jaxnv_inter_token_latency_seconds", "between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt of a request on its way through the runner; events go to `deliver`."""

    request_id: str
    ids: list
    sampling: SamplingParams
    deliver: object  # (Event | Exception) -> None, called on the runner thread
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    last: float | None = None


class Runner:
    """The thread that owns the engine: admits queued jobs between decode steps, steps while
    any slot is active, frees the slots of cancelled jobs before the next step."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._cancelled: set[str] = set()
        self._running: dict[str, Job] = {}
        self._stop = False
        self.failure: str | None = None  # why the engine last failed (`/health` reports it)
        self._thread = threading.Thread(target=self._loop, name="jaxnv-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(self, jobs: list[Job]) -> bool:
        """Queue all of `jobs`, or none (False) when the queue has no room for them."""
        with self._cond:
            if len(self._pending) + len(jobs) > self.max_queue:
                return False
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return True

    def cancel(self, request_id: str) -> None:
        """Drop a job: from the queue at once, from its slot before the next decode step."""
        with self._cond:
            queued = [j for j in self._pending if j.request_id == request_id]
            for job in queued:
                self._pending.remove(job)
            if not queued:
                self._cancelled.add(request_id)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stop or self._pending or self._cancelled or engine.active):
                    self._cond.wait()
                if self._stop:
                    return
                cancelled, self._cancelled = self._cancelled, set()
                for rid in cancelled:
                    if engine.cancel(rid):
                        self._running.pop(rid, None)
                admit = []
                while self._pending and len(admit) < engine.free_slots:
                    admit.append(self._pending.popleft())
                self.metrics.queue_depth.set(len(self._pending))
            events = []
            for job in admit:
                self._running[job.request_id] = job
                events.append(
                    self._guard(lambda j=job: [engine.insert(j.request_id, j.ids, j.sampling)])
                )
            if engine.active:
                events.append(self._guard(engine.step))
            for event in (e for batch in events for e in batch):
                self._dispatch(event)
            self.metrics.active_slots.set(engine.active)

    def _guard(self, fn) -> list[Event]:
        """Run an engine call; a failure fails every running job and is kept in `failure`
        (`/health` answers 503 from then on; the server keeps trying the requests that come)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (reported to the clients as a 500)
            log.error("the engine failed; its %d running requests fail", len(self._running),
                      exc_info=e)  # fmt: skip
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.failure = f"the engine failed at {when} ({type(e).__name__}): see the server log"
            for rid, job in list(self._running.items()):
                self.engine.cancel(rid)
                job.deliver(e)
            self._running.clear()
            return []

    def _dispatch(self, event: Event) -> None:
        job = self._running.get(event.request_id)
        if job is None:
            return
        now = time.perf_counter()
        m = self.metrics
        (m.ttft if job.last is None else m.itl).observe(now - (job.last or job.submitted))
        job.last = now
        m.tokens.inc()
        if event.finish_reason is not None:
            del self._running[event.request_id]
        job.deliver(event)
