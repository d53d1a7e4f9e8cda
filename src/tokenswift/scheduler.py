"""One generation at a time on one worker thread, the other requests waiting in a bounded FIFO
queue; cancellation of a waiting or running job when its client leaves."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .api import LM, TextStream
from .engine import Step

if TYPE_CHECKING:
    from .protocol import StopMatcher

log = logging.getLogger("tokenswift.server")

# The run's stats returned in the `tokenswift` field (the rest is planner detail for `--stats`).
PUBLIC_STATS = ("method", "iterations", "new_tokens", "seconds", "prefill_seconds", "decode_seconds", "tokens_per_s",
                "decode_tokens_per_s", "acceptance_rate", "tokens_per_iteration", "accepted_draft_tokens",
                "ngram_share", "mean_trie_size")


@dataclass(eq=False)  # identity, not field equality: jobs are looked up in the waiting queue
class Job:
    """One accepted request: its step generator (created, not started) and its reply's shape."""

    steps: Iterator[Step]
    stop: StopMatcher
    chat: bool
    model: str
    prompt_tokens: int
    method: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: "asyncio.Queue[tuple[str, Any]] | None" = None

    def send(self, kind: str, payload: Any = None) -> None:
        """From the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server shut down
            pass


class Busy(Exception):
    pass


class Scheduler:
    """One generation at a time on one worker thread, up to `queue_size` more waiting (FIFO)."""

    def __init__(self, lm: LM, queue_size: int) -> None:
        self.lm = lm
        self.queue_size = queue_size
        self.cv = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        # Prompts are tokenized on request threads while the worker detokenizes: one at a time.
        self.tok_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        with self.cv:
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="tokenswift-generate", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancelled.set()
                job.send("error", "the server is shutting down")
            self.waiting.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.start()
        with self.cv:
            # a request that finds the worker idle counts as running, even before the worker pops it
            if len(self.waiting) + (self.running is not None) > self.queue_size:
                raise Busy(f"server busy: 1 generation running and {self.queue_size} waiting "
                           f"(--queue-size {self.queue_size}); retry later")
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue now, a running one stops at its next step."""
        job.cancelled.set()
        with self.cv:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1
                job.steps.close()

    def snapshot(self) -> dict[str, Any]:
        with self.cv:
            return {"running": int(self.running is not None), "queued": len(self.waiting),
                    "queue_size": self.queue_size, **self.counts}

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                job = self.running = self.waiting.popleft()
            outcome = self._run(job)
            with self.cv:
                self.running = None
                self.counts[outcome] += 1

    def _run(self, job: Job) -> str:
        """Runs one job, sending its text and its end; returns completed, cancelled or failed."""
        text = TextStream(self.lm.tokenizer)
        produced, stats, finish = 0, {}, "length"
        started = time.perf_counter()
        try:
            if job.cancelled.is_set():  # left while the worker picked it up: skip the prefill
                return "cancelled"
            for step in job.steps:
                if job.cancelled.is_set():
                    return "cancelled"
                produced += len(step.tokens)
                stats = step.stats
                with self.tok_lock:
                    piece = text.push(step.tokens)
                if self._emit(job, piece):
                    finish = "stop"
                    break
                if step.finished:
                    finish = "stop" if stats.get("finish_reason") == "eos" else "length"
            if not job.stop.hit:
                with self.tok_lock:
                    tail = text.flush()
                if self._emit(job, tail):
                    finish = "stop"
                elif rest := job.stop.flush():
                    job.send("text", rest)
            job.send("done", {"finish_reason": finish, "completion_tokens": produced,
                              "stats": public_stats(stats, job, started)})
            return "completed"
        except Exception as e:  # noqa: BLE001 - reported to the client and logged, the worker goes on
            log.exception("generation %s failed", job.id)
            job.send("error", f"generation failed: {e}")
            return "failed"
        finally:
            job.steps.close()  # frees the KV cache now, also when the loop was left early

    @staticmethod
    def _emit(job: Job, piece: str) -> bool:
        out, hit = job.stop.push(piece)
        if out:
            job.send("text", out)
        return hit


def public_stats(stats: dict[str, Any], job: Job, started: float) -> dict[str, Any]:
    out = {k: stats[k] for k in PUBLIC_STATS if k in stats}
    out.setdefault("method", job.method)
    out.setdefault("acceptance_rate", None)  # plain decoding drafts nothing
    out["queue_seconds"] = started - job.enqueued
    return out
