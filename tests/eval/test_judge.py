"""The LLM judge against a real local HTTP server speaking the chat completions API."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptjax.errors import GptjaxError
from gptjax.eval.judge import JudgeConfig, judge_config, judge_prompt, parse_score, score_responses

RECORD = {"instruction": "Rewrite in the past tense.", "input": "I walk home.",
          "output": "I walked home."}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours *_proxy variables; a proxy must not stand between us and 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class FakeJudge:
    """A chat completions server on 127.0.0.1 that records requests and replies from a script."""

    def __init__(self, replies):
        self.replies = list(replies)  # each: str content, (status, body) or ("sleep", s)
        self.requests = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                judge.requests.append({"path": self.path, "body": json.loads(body),
                                       "auth": self.headers.get("Authorization")})
                reply = judge.replies.pop(0)
                if isinstance(reply, tuple) and reply[0] == "sleep":
                    time.sleep(reply[1])
                    reply = "50"
                status, payload = reply if isinstance(reply, tuple) else (200, json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}))
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first, as the timeout test intends

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # closing does not wait for a deliberately slow reply
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # A short poll interval makes shutdown() return at once instead of after 0.5 s.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(GptjaxError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_config_needs_url_and_model_and_reads_the_key(monkeypatch):
    for url, model in ((None, "m"), ("http://h/v1", None), ("", "")):
        assert error_of(judge_config, url, model).startswith("no judge endpoint configured: "
                                                             "pass --judge-url URL")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-endpoint")
    assert judge_config("http://h:1/v1/", "m") == JudgeConfig("http://h:1/v1", "m")  # no key named
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    assert "$JUDGE_TEST_KEY, which is not set" in error_of(judge_config, "http://h/v1", "m", "JUDGE_TEST_KEY")
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-123")
    cfg = judge_config("http://h:1/v1/chat/completions", "m", "JUDGE_TEST_KEY")
    assert cfg.url == "http://h:1/v1" and cfg.api_key == "sk-123"
    assert "http:// or https://" in error_of(judge_config, "localhost:11434/v1", "m")


def test_prompt_holds_task_reference_and_answer():
    prompt = judge_prompt(RECORD, "I walks home.")
    for part in ("Rewrite in the past tense.", "I walk home.", "I walked home.", "I walks home.",
                 "0", "100", "integer"):
        assert part in prompt
    assert "### Response:" not in prompt


@pytest.mark.parametrize("reply, score", [
    ("85", 85), (" 100\n", 100), ("0", 0), ("Score: 72/100", 72), ("I'd say 90.", 90),
    ("**Score:** 64", 64), ("150, no wait, 95", 95), ("7.5", None), ("-3", None),
    ("no idea", None), ("", None), ("v2 gets 40", 40), ("1000", None), ("85%", 85),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_scores_come_from_the_server_with_the_right_request():
    with FakeJudge(["Score: 85", "I cannot grade this.", "100"]) as server:
        cfg = JudgeConfig(server.url, "judge-model", api_key="sk-test", timeout=5)
        scores = score_responses([RECORD] * 3, ["a", "b", "c"], cfg, progress=False)
    assert scores == [85, None, 100]
    assert len(server.requests) == 3
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    (message,) = first["body"]["messages"]
    assert message == {"role": "user", "content": judge_prompt(RECORD, "a")}


def test_no_key_sends_no_authorization_header():
    with FakeJudge(["42"]) as server:
        assert score_responses([RECORD], ["x"], JudgeConfig(server.url, "m"),
                               progress=False) == [42]
    assert server.requests[0]["auth"] is None


def test_http_error_and_odd_replies_are_one_line_errors():
    with FakeJudge([(401, '{"error": {"message": "bad key"}}'), (200, '{"id": 1}')]) as server:
        cfg = JudgeConfig(server.url, "m")
        message = error_of(score_responses, [RECORD], ["x"], cfg, progress=False)
        assert f"{server.url}/chat/completions" in message and "HTTP 401" in message
        assert "bad key" in message
        message = error_of(score_responses, [RECORD], ["x"], cfg, progress=False)
        assert "did not reply with a chat completion" in message


def test_timeout_is_reported():
    with FakeJudge([("sleep", 0.6)]) as server:
        message = error_of(score_responses, [RECORD], ["x"], JudgeConfig(server.url, "m",
                                                                         timeout=0.2),
                           progress=False)
    assert "timed out after 0.2 s" in message


def test_unreachable_server_names_the_url():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    message = error_of(score_responses, [RECORD], ["x"], JudgeConfig(url, "m", timeout=5),
                       progress=False)
    assert message.startswith(f"judge request to {url}/chat/completions failed: ")
    assert "refused" in message.lower()


def test_mismatched_lengths():
    with pytest.raises(ValueError):
        score_responses([RECORD], [], JudgeConfig("http://127.0.0.1:9/v1", "m"), progress=False)
