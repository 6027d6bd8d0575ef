"""Continuous batching: a thread that admits waiting requests into the engine's free slots
between decode steps and retires finished ones, so requests of any length share every step.

Each iteration: drop cancelled requests (a disconnected client frees its slot before the
next step), prefill waiting requests into free slots (up to a prompt-token budget, so a
burst of long prompts cannot stall the running ones for long), then one decode step for
every slot. Text is decoded per request on this thread; stop strings end a request on the
host (gptjax.generation.textgen.TextRow), end-of-text and max_tokens too. Callers get
events through the request's `on_event`, called from this thread: hand them to your own
loop (the server does so with `call_soon_threadsafe`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from gptjax.data.tokenizer import Tokenizer
from gptjax.generation.textgen import TextRow
from gptjax.serve.engine import Engine

log = logging.getLogger("gptjax.serve")
_ids = itertools.count()


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows (the server answers 429)."""


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float
    top: dict[int, float] | None  # the 5 most likely ids' log-probabilities, when asked


@dataclass(eq=False)  # a request is itself: the queue finds and removes it by identity
class Request:
    """What to generate, and where its events go: on_event("text", (piece, [Token])) as
    text becomes safe to show, then on_event("done", finish_reason) ("stop" or "length"),
    or on_event("error", message)."""

    prompt: list[int]
    max_tokens: int
    on_event: Callable[[str, object], None]
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    stop_at_eot: bool = True
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0


class _Live:
    def __init__(self, request: Request):
        self.request = request
        self.text = TextRow([s for s in request.stop if s])  # holds the ids, too
        self.tokens: list[Token] = []  # not yet sent
        self.last_at = 0.0


class NullMetrics:
    """What the scheduler reports; gptjax.serve.metrics.Metrics records it for /metrics."""

    def queue_depth(self, n: int) -> None: ...
    def occupancy(self, live: int, slots: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def step(self, live: int) -> None: ...


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, max_queue: int = 256,
                 prefill_budget: int | None = None, metrics=None):
        self.engine, self.tokenizer, self.max_queue = engine, tokenizer, max_queue
        self.prefill_budget = prefill_budget or engine.max_len
        self.metrics = metrics or NullMetrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._slots: list[_Live | None] = [None] * engine.slots
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="gptjax-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when more than max_queue would wait beyond the free
        slots, ValueError for a request the engine cannot hold."""
        self._check(request)
        with self._wake:
            free = sum(s is None for s in self._slots)
            if len(self._waiting) - free >= self.max_queue:
                raise QueueFull(f"{len(self._waiting) - free} requests are already waiting")
            self._waiting.append(request)
            self.metrics.queue_depth(len(self._waiting))
            self._wake.notify()

    def _check(self, r: Request) -> None:
        n, limit = len(r.prompt), self.engine.max_len
        if not r.prompt or r.max_tokens < 1 or n + r.max_tokens > limit:
            raise ValueError(f"a request needs a prompt and 1 or more new tokens within {limit} "
                             f"tokens; got {n} + {r.max_tokens}")
        if not all(0 <= i < self.engine.valid_vocab for i in r.prompt):
            raise ValueError(f"prompt ids must be in [0, {self.engine.valid_vocab})")
        r.top_k = min(max(int(r.top_k), 0), self.engine.valid_vocab)  # k >= vocabulary: all of it

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (its client went away): it leaves the queue, or its
        slot frees before the next decode step; it gets no more events."""
        with self._wake:
            request.cancelled = True
            try:
                self._waiting.remove(request)
                self.metrics.queue_depth(len(self._waiting))
            except ValueError:
                pass  # running, finished, or never queued
            self._wake.notify()

    @property
    def alive(self) -> bool:
        """Whether the decode loop is running (False before start and after a crash)."""
        return self._thread.is_alive()

    @property
    def live(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self.live:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._retire_cancelled()
                self._admit()
                if self.live:
                    self._step()
            except Exception as e:  # a device failure: every request in flight hears of it
                log.exception("the decode loop failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _retire_cancelled(self) -> None:
        for slot, live in enumerate(self._slots):
            if live is not None and live.request.cancelled:
                self._free(slot)

    def _admit(self) -> None:
        budget = self.prefill_budget
        while budget > 0:
            free = next((i for i, s in enumerate(self._slots) if s is None), None)
            with self._wake:
                if free is None or not self._waiting:
                    break
                request = self._waiting.popleft()
                self.metrics.queue_depth(len(self._waiting))
            if request.cancelled:
                continue
            budget -= len(request.prompt)
            live = self._slots[free] = _Live(request)
            try:
                sampled = self.engine.start(free, request.prompt, request.temperature,
                                            request.top_k, request.top_p, request.seed,
                                            request.logprobs)
            except Exception as e:  # this request's fault or not, the others go on
                log.exception("a prefill failed")
                self._free(free)
                _tell(request, "error", f"generation failed: {type(e).__name__}: {e}")
                continue
            self._accept(free, live, sampled, 0)
        self.metrics.occupancy(self.live, self.engine.slots)

    def _step(self) -> None:
        wants_logprobs = any(s is not None and s.request.logprobs for s in self._slots)
        sampled = self.engine.step(wants_logprobs)
        self.steps += 1
        self.metrics.step(self.live)
        for slot, live in enumerate(self._slots):
            if live is not None:
                self._accept(slot, live, sampled, slot)

    def _accept(self, slot: int, live: _Live, sampled, row: int) -> None:
        """Take the id the engine drew for this request; end it if that was its last."""
        r, now = live.request, time.perf_counter()
        token_id = int(sampled.ids[row])
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.first_token(now - r.submitted)
        else:
            self.metrics.inter_token(now - live.last_at)
        live.last_at = now
        r.completion_tokens += 1
        top = None
        if r.logprobs and sampled.top_ids is not None:
            top = dict(zip(sampled.top_ids[row].tolist(), sampled.top_logprobs[row].tolist()))
        eot = r.stop_at_eot and token_id == self.tokenizer.eot_id
        if r.cancelled:  # its client left during this step
            self._free(slot)
            return
        if not eot:
            live.tokens.append(Token(token_id, float(sampled.logprobs[row]), top))
            live.text.extend([token_id], self.tokenizer.decode)
        reason = ("stop" if eot or live.text.stopped
                  else "length" if r.completion_tokens >= r.max_tokens else None)
        piece = live.text.unshown(final=reason is not None)
        if piece or (reason and live.tokens):
            if not _tell(r, "text", (piece, live.tokens)):
                reason = "cancelled"
            live.tokens = []
        if reason:
            self._free(slot)
            if reason != "cancelled":
                _tell(r, "done", reason)

    def _free(self, slot: int) -> None:
        self.engine.free(slot)
        self._slots[slot] = None
        self.metrics.occupancy(self.live, self.engine.slots)

    def _fail_all(self, message: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot, live in enumerate(self._slots):
            if live is not None:
                self._free(slot)
                waiting.append(live.request)
        for r in waiting:
            if not r.cancelled:
                _tell(r, "error", message)


def _tell(r: Request, kind: str, data) -> bool:
    """Give `r` an event; a callback that raises cancels its own request, and only that
    (False then), never the loop."""
    try:
        r.on_event(kind, data)
        return True
    except Exception:
        log.exception("a request's event handler failed; the request is cancelled")
        r.cancelled = True
        return False
