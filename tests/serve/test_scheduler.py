"""Continuous batching: greedy outputs under any concurrency are the single-request ones
(and the reference decoder's), nothing compiles after warm-up whatever the requests,
cancelled requests free their slots, a full queue is refused, and stop strings cut."""

import dataclasses
import threading
import time

import jax
import pytest

from gptjax import model
from gptjax.config import preset
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.generation.decoder import generate
from gptjax.serve.engine import Engine
from gptjax.serve.scheduler import QueueFull, Request, Scheduler
from gptjax.training.compile_log import COMPILE_EVENT

TOKENIZER = ByteTokenizer()
CONFIG = dataclasses.replace(preset("tiny", vocab_size=TOKENIZER.vocab_size), context_length=64)
PROMPTS = [b"To be", b"or not to be, that is", b"x", b"the question whether tis nobler",
           b"in the mind", b"to suffer the slings and arrows"]


@pytest.fixture(scope="module")
def params():
    return model.init(CONFIG, jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def scheduler(params):
    engine = Engine(params, CONFIG, 4, TOKENIZER.vocab_size)
    engine.warm_up()
    s = Scheduler(engine, TOKENIZER, max_queue=64).start()
    yield s
    s.stop()


class Collected:
    def __init__(self):
        self.text, self.tokens, self.reason, self.done = "", [], None, threading.Event()

    def __call__(self, kind, data):
        if kind == "text":
            self.text += data[0]
            self.tokens += data[1]
        else:
            self.reason = data
            self.done.set()


def _run(scheduler, requests):
    """Submit all at once; wait for every one to end."""
    sinks = []
    for kwargs in requests:
        sink = Collected()
        scheduler.submit(Request(on_event=sink, **kwargs))
        sinks.append(sink)
    for sink in sinks:
        assert sink.done.wait(120)
    return sinks


def _greedy(prompt: bytes, n: int) -> dict:
    return {"prompt": list(prompt), "max_tokens": n, "temperature": 0.0}


def test_greedy_outputs_under_concurrency_are_the_single_request_ones(scheduler, params):
    asks = [_greedy(p, n) for p, n in zip(PROMPTS, (20, 7, 30, 12, 25, 3))]
    alone = [_run(scheduler, [a])[0] for a in asks]
    steps = scheduler.steps
    together = _run(scheduler, asks)  # six requests, four slots: two wait, then join
    # one request at a time would take sum(n - 1) = 91 steps; four slots share them
    assert scheduler.steps - steps < 0.6 * sum(a["max_tokens"] - 1 for a in asks)
    for a, one, many in zip(asks, alone, together):
        assert [t.id for t in many.tokens] == [t.id for t in one.tokens] and many.text == one.text
        reference = generate(params, CONFIG, a["prompt"], a["max_tokens"], temperature=0,
                             eot_id=TOKENIZER.eot_id)
        assert [t.id for t in one.tokens] == [i for i in reference if i != TOKENIZER.eot_id]
        assert one.reason == ("stop" if TOKENIZER.eot_id in reference else "length")


def test_a_seeded_sample_is_the_same_alone_and_in_company(scheduler):
    ask = {"prompt": list(b"Once"), "max_tokens": 16, "temperature": 1.0, "top_k": 40,
           "top_p": 0.9, "seed": 11}
    alone = _run(scheduler, [ask])[0]
    crowd = _run(scheduler, [_greedy(b"noise", 30), ask, {**ask, "seed": 12}])
    assert [t.id for t in crowd[1].tokens] == [t.id for t in alone.tokens]
    assert [t.id for t in crowd[2].tokens] != [t.id for t in alone.tokens]


def test_nothing_compiles_after_warm_up_whatever_the_requests(scheduler):
    compiles = []

    def listen(event, seconds, **kw):
        if event == COMPILE_EVENT:
            compiles.append(kw.get("fun_name"))
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        _run(scheduler, [
            _greedy(b"a" * 60, 4), _greedy(b"bb", 50), _greedy(b"c" * 17, 10),
            {"prompt": list(b"top k"), "max_tokens": 9, "temperature": 0.7, "top_k": 5, "seed": 1},
            {"prompt": list(b"top p"), "max_tokens": 9, "temperature": 1.3, "top_p": 0.5, "seed": 2},
            {"prompt": list(b"logprobs"), "max_tokens": 5, "temperature": 0.0, "logprobs": True}])
        jax.jit(lambda x: x + 1)(1.0)  # the listener hears a compile: this one
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == ["jit(<lambda>)"]


def test_logprobs_are_the_models_and_the_greedy_id_is_the_top_one(scheduler):
    got = _run(scheduler, [{**_greedy(b"Hello", 6), "logprobs": True}])[0]
    for t in got.tokens:
        assert t.logprob <= 0 and max(t.top.values()) == pytest.approx(t.logprob)
        assert max(t.top, key=t.top.get) == t.id and len(t.top) == 5


def test_a_stop_string_ends_the_request_and_is_not_returned(scheduler):
    full = _run(scheduler, [_greedy(b"To be", 30)])[0]
    stop = full.text[5:7]
    assert len(stop) == 2 and full.text.find(stop) >= 0
    cut = _run(scheduler, [{**_greedy(b"To be", 30), "stop": (stop,)}])[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.reason == "stop"


def test_a_cancelled_request_frees_its_slot_and_hears_no_more(scheduler):
    heard = []
    first = threading.Event()

    def sink(kind, data):
        heard.append(kind)
        first.set()
    request = Request(list(b"long"), 55, sink, temperature=0.0, stop_at_eot=False)
    scheduler.submit(request)
    assert first.wait(60)
    scheduler.cancel(request)
    at_cancel = len(heard)
    after = _run(scheduler, [_greedy(b"next", 3)])[0]  # served after the slot was freed
    assert after.reason and scheduler.live == 0
    assert "done" not in heard and len(heard) <= at_cancel + 1  # one may be on its way
    assert request.completion_tokens < 55


def test_a_request_the_engine_cannot_hold_is_refused_at_submit(scheduler):
    for bad in (Request([], 4, print), Request([1], 0, print), Request([1] * 60, 5, print),
                Request([300], 4, print)):
        with pytest.raises(ValueError):
            scheduler.submit(bad)
    huge = _run(scheduler, [{**_greedy(b"k", 4), "temperature": 1.0, "top_k": 2**40, "seed": 1}])[0]
    assert huge.reason  # a top-k past the vocabulary is all of it


def test_a_failing_event_handler_cancels_only_its_own_request(scheduler):
    def broken(kind, data):
        raise RuntimeError("the client's handler broke")
    scheduler.submit(Request(list(b"doomed"), 20, broken, temperature=0.0))
    fine = _run(scheduler, [_greedy(b"fine", 20)])[0]
    assert fine.reason and len(fine.tokens) >= 1 and scheduler.alive
    deadline = time.time() + 10
    while scheduler.live and time.time() < deadline:
        time.sleep(0.01)
    assert scheduler.live == 0


def test_a_full_queue_counts_only_requests_beyond_the_free_slots(params):
    engine = Engine(params, CONFIG, 2, TOKENIZER.vocab_size)
    s = Scheduler(engine, TOKENIZER, max_queue=2)  # not started: nothing leaves the queue
    queued = [Request([1], 1, lambda *_: None) for _ in range(4)]  # 2 for the slots, 2 waiting
    for r in queued:
        s.submit(r)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        s.submit(Request([1], 1, lambda *_: None))
    s.cancel(queued[0])  # a cancelled request leaves the queue at once
    s.submit(Request([1], 1, lambda *_: None))
