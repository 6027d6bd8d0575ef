"""The HTTP API against the official openai client on a loopback port: completions and
chat, streaming and not, equal the reference decoder's text; concurrent streams get their
single-request answers; every bad request is a 4xx in OpenAI's error shape and the server
answers the next; a closed stream frees its slot; /metrics counts what happened."""

import concurrent.futures
import json
import logging
import time

import httpx
import openai
import pytest
from conftest import byte_base

from gptjax.generation.sampling import Sampling
from gptjax.generation.textgen import generate_text
from gptjax.serve.app import Options, create_app
from gptjax.serve.background import BackgroundServer
from gptjax.serve.engine import Engine
from gptjax.serve.metrics import Metrics
from gptjax.serve.scheduler import Request, Scheduler
from gptjax.serve.served import load_served

KEY = "sk-test-key"


class Server(BackgroundServer):
    def __init__(self, served, scheduler, metrics, options):
        super().__init__(create_app(served, scheduler, metrics, options))
        self.start()

    def close(self):
        self.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory, corpus_file):
    root = byte_base(tmp_path_factory.mktemp("serve"), corpus_file)
    return load_served(run=str(root / "base"), name="tiny-bytes")


@pytest.fixture(scope="module")
def stack(served):
    engine = Engine(served.params, served.config, 4, served.tokenizer.vocab_size)
    engine.warm_up()
    metrics = Metrics()
    scheduler = Scheduler(engine, served.tokenizer, max_queue=8, metrics=metrics).start()
    yield served, scheduler, metrics
    scheduler.stop()


@pytest.fixture(scope="module")
def server(stack):
    s = Server(*stack, Options(api_key=KEY, max_body_bytes=4096))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _reference(served, prompt: str, n: int) -> str:
    return generate_text(served.params, served.config, served.tokenizer, [prompt], n,
                         Sampling(temperature=0.0))[0]


def test_a_completion_is_the_reference_decoders_text_streamed_or_not(client, served):
    want = _reference(served, "Every effort moves", 40)
    got = client.completions.create(model="tiny-bytes", prompt="Every effort moves", max_tokens=40,
                                    temperature=0)
    assert got.choices[0].text == want and got.object == "text_completion"
    assert got.usage.prompt_tokens == len("Every effort moves") and got.usage.completion_tokens <= 40
    pieces = list(client.completions.create(model="tiny-bytes", prompt="Every effort moves",
                                            max_tokens=40, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_streams_the_same_answer_it_gives_whole(client, served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    whole = client.chat.completions.create(model="tiny-bytes", messages=messages, max_tokens=20,
                                           temperature=0)
    text, _ = served.chat_prompt(messages)
    assert served.template == "transcript" and text.endswith("user: Hello?\nassistant:")
    want = _reference(served, text, 20).split("\nuser:")[0]
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-bytes", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_streams_get_their_single_request_answers(client, served):
    words = ["a", "bee", "sea", "dee", "e", "ef", "gee", "h"]
    prompts = [f"{word} " * (i + 1) for i, word in enumerate(words)]

    def stream(prompt):
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny-bytes", prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(stream, prompts))  # 8 streams, 4 slots, a queue of 8
    assert answers == [_reference(served, p, 24) for p in prompts]


def test_logprobs_and_n_choices(client):
    got = client.completions.create(model="tiny-bytes", prompt="abc", max_tokens=5, temperature=0,
                                    logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(best)
               for top, best in zip(lp.top_logprobs, lp.token_logprobs))
    seeded = client.completions.create(model="tiny-bytes", prompt="abc", max_tokens=8, n=3, seed=5)
    again = client.completions.create(model="tiny-bytes", prompt="abc", max_tokens=8, n=3, seed=5)
    assert [c.index for c in seeded.choices] == [0, 1, 2]
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]
    assert len({c.text for c in seeded.choices}) > 1  # each choice draws with its own seed
    pieces = list(client.completions.create(model="tiny-bytes", prompt="abc", max_tokens=6,
                                            temperature=0, logprobs=1, stream=True))
    offsets = [o for p in pieces for o in p.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets) == 6  # across chunks


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-bytes"]


BAD = [
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens must be >= 1"),
    ({"prompt": "hi", "temperature": -0.5}, 400, "temperature must be in [0, 2]"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "model": "gpt-9"}, 404, "the model 'gpt-9' does not exist"),
    ({"prompt": "x" * 180, "max_tokens": 10}, 400, "this server's context is 184 tokens"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or a list"),
    ({"prompt": [1, 2, 300]}, 400, "token ids outside the vocabulary of 257"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_a_bad_request_is_a_4xx_error_and_the_next_is_served(server, client, body, status, message):
    answer = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-bytes", **body},
                        headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny-bytes", prompt="ok", max_tokens=2).choices


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny-bytes", prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("content, status, message", [
    (b"{not json", 400, "the body is not valid JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    (json.dumps({"prompt": "y" * 5000}).encode(), 413, "the body is over 4096 bytes"),
])
def test_malformed_and_oversized_bodies(server, content, status, message):
    answer = httpx.post(f"{server.url}/v1/completions", content=content,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_closed_stream_frees_its_slot_at_once(server, stack, caplog):
    _, scheduler, _ = stack
    caplog.set_level(logging.INFO, logger="gptjax.serve.requests")
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "go", "max_tokens": 170, "stream": True, "temperature": 1.0,
                            "seed": 3}, timeout=60) as answer:
        next(answer.iter_lines())  # the first token arrived; then the client hangs up
    deadline = time.time() + 10
    while not caplog.records and time.time() < deadline:
        time.sleep(0.01)
    record = json.loads(caplog.records[-1].getMessage())
    assert record["status"] == 499 and record["finish_reasons"] == [None]
    while scheduler.live and time.time() < deadline:  # freed at the scheduler's next turn
        time.sleep(0.001)
    assert scheduler.live == 0 and record["completion_tokens"] < 170


def test_a_full_queue_answers_429(stack, client):
    served, _, _ = stack
    metrics = Metrics()
    engine = Engine(served.params, served.config, 1, served.tokenizer.vocab_size)
    idle = Scheduler(engine, served.tokenizer, max_queue=0, metrics=metrics)  # never started
    idle.submit(Request([1], 1, lambda *_: None))  # holds the one slot's place
    s = Server(served, idle, metrics, Options())
    try:
        answer = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"})
        assert answer.status_code == 429 and answer.json()["error"]["code"] == "queue_full"
    finally:
        s.close()


class SlowEngine(Engine):
    """10 ms a step: a long answer outlasts the client's patience on any machine."""

    def step(self, logprobs=False):
        time.sleep(0.01)
        return super().step(logprobs)


def test_a_client_that_stops_waiting_for_a_whole_answer_frees_its_slot(stack, caplog):
    served, _, _ = stack
    caplog.set_level(logging.INFO, logger="gptjax.serve.requests")
    engine = SlowEngine(served.params, served.config, 2, served.tokenizer.vocab_size)
    metrics = Metrics()
    scheduler = Scheduler(engine, served.tokenizer, metrics=metrics).start()
    s = Server(served, scheduler, metrics, Options())
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{s.url}/v1/completions", timeout=0.5,
                       json={"prompt": "go", "max_tokens": 170, "temperature": 0, "stop": []})
        deadline = time.time() + 10
        while not caplog.records and time.time() < deadline:
            time.sleep(0.01)
        record = json.loads(caplog.records[-1].getMessage())
        assert record["status"] == 499 and record["completion_tokens"] < 150
        while scheduler.live and time.time() < deadline:
            time.sleep(0.001)
        assert scheduler.live == 0
    finally:
        s.close()
        scheduler.stop()


def test_truncation_keeps_the_end_of_a_long_prompt(stack, served):
    s = Server(*stack, Options(truncate=True))
    try:
        long = "z" * 300 + "the end"
        got = httpx.post(f"{s.url}/v1/completions", json={"prompt": long, "max_tokens": 8,
                                                           "temperature": 0}, timeout=60).json()
        assert got["usage"]["prompt_tokens"] == 184 - 8
        assert got["choices"][0]["text"] == _reference(served, long[-(184 - 8):], 8)
    finally:
        s.close()


def test_metrics_count_requests_tokens_and_latencies(server, client):
    client.completions.create(model="tiny-bytes", prompt="count me", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'gptjax_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'gptjax_requests_total{endpoint="/v1/completions",status="400"}' in text
    def value(name):
        return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])
    for name in ("gptjax_prompt_tokens_total", "gptjax_completion_tokens_total",
                 "gptjax_time_to_first_token_seconds_count", "gptjax_inter_token_latency_seconds_count",
                 "gptjax_decode_steps_total"):
        assert value(name) >= 1, name
    assert value("gptjax_completion_tokens_total") >= value("gptjax_time_to_first_token_seconds_count")
    assert value("gptjax_queue_depth") == 0 and value("gptjax_batch_occupancy") == 0  # all done
