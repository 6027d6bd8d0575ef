"""The OpenAI API's request fields, checked, and its error shape.

Every check raises ApiError with the HTTP status, a message naming the field and the
field itself, which the app turns into OpenAI's {"error": {...}} body. Fields the API has
and gptjax does not act on (user, penalties at 0, ...) are accepted and ignored; ones it
cannot honour (echo, best_of, non-zero penalties) are refused rather than silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_STOPS = 4  # OpenAI's limit
MAX_N = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None  # None: to the end of the context (chat's default)
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, low=None, high=None, *, integer=False,
            low_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
        and not isinstance(value, bool)
    if not ok_type or (not integer and not _finite(value)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got "
                            f"{value!r}", name)
    if (low is not None and (value <= low if low_open else value < low)) or \
            (high is not None and value > high):
        span = f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {span}, got {value}", name)
    return value


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def sampling(body: dict, max_tokens_field: str = "max_tokens", default_max_tokens=16) -> Sampling:
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0, -2, 2):
            raise ApiError(400, f"{name} is not supported (only 0)", name)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported (only 1)", "best_of")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", "echo")
    max_tokens = _number(body, max_tokens_field, default_max_tokens, 1, integer=True)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Sampling(max_tokens=max_tokens,
                    temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                    top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
                    top_k=_number(body, "top_k", 0, 0, integer=True),
                    seed=_number(body, "seed", None, integer=True),
                    stop=tuple(s for s in stops if s), n=_number(body, "n", 1, 1, MAX_N, integer=True),
                    stream=stream, include_usage=bool(options.get("include_usage")))


def completion_prompt(body: dict) -> str | list[int]:
    """The one prompt of a completions request: a string, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the client's batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                    for i in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "one prompt per request (send a batch as separate requests)", "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")


def logprobs(body: dict) -> int | None:
    """Completions' logprobs: how many alternatives per token (0-5), or None (off)."""
    return _number(body, "logprobs", None, 0, 5, integer=True)


def messages(body: dict) -> list[dict]:
    """A chat request's messages as [{"role", "content": str}]."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(given):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can be read here
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs are supported by /v1/completions only", "logprobs")
    return out
