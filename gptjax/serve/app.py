"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions (both
streaming as server-sent events), /v1/models, /health and /metrics.

Handlers only parse, submit to the scheduler and relay its events; the scheduler's thread
does all device work. A client that goes away (a closed stream, or a dropped connection
while waiting for a whole answer) cancels its requests, which frees their slots before the
next decode step. Every error is OpenAI's {"error": {...}} body, a 4xx for the client's
mistakes (a 500 only when generation itself fails), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from gptjax.errors import GptjaxError
from gptjax.serve import protocol
from gptjax.serve.metrics import Metrics
from gptjax.serve.protocol import ApiError
from gptjax.serve.scheduler import QueueFull, Request, Scheduler
from gptjax.serve.served import Served

request_log = logging.getLogger("gptjax.serve.requests")
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25


@dataclass
class Options:
    api_key: str | None = None  # a bearer token /v1/ needs; None: open
    log_prompts: bool = False
    truncate: bool = False  # keep a too-long prompt's last tokens instead of answering 400
    max_body_bytes: int = 1 << 20


class _Choices:
    """The events of a request's n choices, moved from the scheduler thread onto the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def sink(self, index: int):
        def on_event(kind, data):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, data))
        return on_event


def create_app(served: Served, scheduler: Scheduler, metrics: Metrics,
               options: Options = Options()) -> FastAPI:
    app = FastAPI(title="gptjax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CountRequests, metrics=metrics)
    started = int(time.time())
    ctx, tok = scheduler.engine.max_len, served.tokenizer  # the tokens a request may hold

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):
        logging.getLogger("gptjax.serve").exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")
                            .body(), status_code=500)

    def authorize(http: HttpRequest) -> None:
        if options.api_key is None:
            return
        given = http.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "incorrect or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def read_json(http: HttpRequest) -> dict:
        authorize(http)
        declared = http.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise ApiError(413, f"the body is over {options.max_body_bytes} bytes")
        raw = await http.body()
        if len(raw) > options.max_body_bytes:
            raise ApiError(413, f"the body is over {options.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("model") not in (served.name, None):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server "
                                f"serves {served.name!r}", "model", code="model_not_found")
        return body

    def encode(text: str) -> list[int]:
        try:
            return tok.encode(text)
        except GptjaxError as e:  # a character-level vocabulary without the character
            raise ApiError(400, f"the prompt cannot be tokenized: {e}", "prompt") from None

    def fit(ids: list[int], max_tokens: int | None) -> tuple[list[int], int]:
        """The prompt and token count inside the context, or a 400 (or the prompt's end, with
        --truncate)."""
        ids = ids or [tok.eot_id]  # an empty prompt starts a document
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary of {tok.vocab_size}: {bad[:5]}",
                           "prompt")
        if max_tokens is None:  # chat: what the context leaves (a quarter of it, truncating)
            max_tokens = ctx - len(ids) if len(ids) < ctx or not options.truncate else ctx // 4
            if max_tokens < 1:
                raise ApiError(400, f"this server's context is {ctx} tokens and the prompt fills "
                                    "it", "messages", code="context_length_exceeded")
        if max_tokens >= ctx:
            raise ApiError(400, f"max_tokens must be below the context length ({ctx})", "max_tokens")
        if len(ids) + max_tokens > ctx:
            if not options.truncate:
                raise ApiError(400, f"this server's context is {ctx} tokens; the prompt has "
                                    f"{len(ids)} and max_tokens asks for {max_tokens}", "prompt",
                               code="context_length_exceeded")
            ids = ids[len(ids) + max_tokens - ctx:]
        return ids, max_tokens

    def submit(ids, max_tokens, s: protocol.Sampling, stops, logprobs, choices: _Choices) -> list[Request]:
        seed = s.seed if s.seed is not None else secrets.randbits(31)
        requests = [Request(ids, max_tokens, choices.sink(i), temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, seed=(seed + i) % 2**32, stop=stops,
                            logprobs=logprobs is not None) for i in range(s.n)]
        submitted = []
        try:
            for r in requests:
                scheduler.submit(r)
                submitted.append(r)
        except (QueueFull, ValueError) as e:
            for r in submitted:
                scheduler.cancel(r)
            if isinstance(e, ValueError):
                raise ApiError(400, str(e), "prompt") from None
            raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                           code="queue_full") from None
        metrics.prompt_tokens.inc(len(ids) * len(requests))
        return requests

    async def generate(http: HttpRequest, endpoint: str, body: dict, prompt_text: str | None,
                       ids: list[int], s: protocol.Sampling, stops, logprobs, render):
        ids, max_tokens = fit(ids, s.max_tokens)
        choices = _Choices(asyncio.get_running_loop())
        requests = submit(ids, max_tokens, s, stops, logprobs, choices)
        record = {"id": f"{'chatcmpl' if 'chat' in endpoint else 'cmpl'}-{secrets.token_hex(12)}",
                  "endpoint": endpoint, "prompt_tokens": len(ids), "n": s.n, "stream": s.stream,
                  "started": time.perf_counter()}
        if options.log_prompts:
            record["prompt"] = prompt_text if prompt_text is not None else ids
        if s.stream:
            return StreamingResponse(_stream(choices, requests, render, record, s),
                                     media_type="text/event-stream")
        return await _whole(http, choices, requests, render, record, s)

    def finish_log(record: dict, requests: list[Request], status: int, reasons) -> None:
        ttfts = [r.first_token_at - r.submitted for r in requests if r.first_token_at]
        record.update(status=status, completion_tokens=sum(r.completion_tokens for r in requests),
                      ttft_s=round(min(ttfts), 4) if ttfts else None,
                      duration_s=round(time.perf_counter() - record.pop("started"), 4),
                      finish_reasons=reasons)
        request_log.info(json.dumps(record))

    async def _stream(choices: _Choices, requests, render, record, s):
        ended, reasons, status = 0, [None] * len(requests), 200
        try:
            opening = render.chunk(record["id"], None, "", [], None, first=True)
            if opening:
                yield _sse(opening)
            while ended < len(requests):
                i, kind, data = await choices.queue.get()
                if kind == "text":
                    yield _sse(render.chunk(record["id"], i, data[0], data[1], None))
                elif kind == "done":
                    ended, reasons[i] = ended + 1, data
                    yield _sse(render.chunk(record["id"], i, "", [], data))
                else:
                    status = 500
                    yield _sse(ApiError(500, data, kind="server_error").body())
                    return
            if s.include_usage:
                yield _sse(render.usage_chunk(record["id"], _usage(record, requests)))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499  # the client closed the stream
            raise
        finally:
            for r in requests:
                scheduler.cancel(r)  # a no-op for those already finished
            finish_log(record, requests, status, reasons)

    async def _whole(http, choices: _Choices, requests, render, record, s):
        texts, tokens = [""] * len(requests), [[] for _ in requests]
        reasons, ended = [None] * len(requests), 0
        checked = time.monotonic()
        try:
            while ended < len(requests):
                # On a clock, not only when idle: tokens may arrive faster than the poll.
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        finish_log(record, requests, 499, reasons)
                        return Response(status_code=499)
                try:
                    i, kind, data = await asyncio.wait_for(choices.queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    continue
                if kind == "text":
                    texts[i] += data[0]
                    tokens[i] += data[1]
                elif kind == "done":
                    ended, reasons[i] = ended + 1, data
                else:
                    finish_log(record, requests, 500, reasons)
                    raise ApiError(500, data, kind="server_error")
        finally:
            for r in requests:
                scheduler.cancel(r)
        finish_log(record, requests, 200, reasons)
        return JSONResponse(render.whole(record["id"], texts, tokens, reasons, _usage(record, requests)))

    def _usage(record, requests) -> dict:
        done = sum(r.completion_tokens for r in requests)
        return {"prompt_tokens": record["prompt_tokens"], "completion_tokens": done,
                "total_tokens": record["prompt_tokens"] + done}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_json(http)
        s = protocol.sampling(body)
        prompt = protocol.completion_prompt(body)
        n_logprobs = protocol.logprobs(body)
        ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
        render = _CompletionShape(served.name, started, tok, n_logprobs)
        return await generate(http, "/v1/completions", body, prompt if isinstance(prompt, str) else None,
                              ids, s, s.stop, n_logprobs, render)

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = await read_json(http)
        s = protocol.sampling(body, "max_completion_tokens" if "max_completion_tokens" in body
                              else "max_tokens", default_max_tokens=None)
        messages = protocol.messages(body)
        try:
            text, template_stops = served.chat_prompt(messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        return await generate(http, "/v1/chat/completions", body, text, encode(text), s,
                              s.stop + template_stops, None, _ChatShape(served.name, started, s.n))

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        authorize(http)
        return {"object": "list", "data": [{"id": served.name, "object": "model",
                                            "created": started, "owned_by": "gptjax"}]}

    @app.get("/health")
    async def health():
        if not scheduler.alive:  # the decode loop died: nothing would ever be answered
            return JSONResponse({"status": "down", "live": 0, "waiting": scheduler.waiting},
                                status_code=503)
        return {"status": "ok", "live": scheduler.live, "waiting": scheduler.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _CompletionShape:
    """/v1/completions' response objects."""

    def __init__(self, model: str, created: int, tokenizer, logprobs: int | None):
        self.model, self.created, self.tok, self.logprobs = model, created, tokenizer, logprobs
        self._offsets: dict[int, int] = {}  # choice -> characters before its next token

    def _logprobs(self, tokens, index: int = 0):
        if self.logprobs is None:
            return None
        texts = [self.tok.decode([t.id]) for t in tokens]
        offset = self._offsets.get(index, 0)  # a stream's offsets go on from its last chunk
        offsets = [offset + sum(map(len, texts[:i])) for i in range(len(texts))]
        self._offsets[index] = offset + sum(map(len, texts))
        top = [{self.tok.decode([i]): lp for i, lp in list(t.top.items())[:self.logprobs]}
               if self.logprobs and t.top else None for t in tokens]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top if self.logprobs else None, "text_offset": offsets}

    def _head(self, rid: str) -> dict:
        return {"id": rid, "object": "text_completion", "created": self.created, "model": self.model}

    def chunk(self, rid, index, text, tokens, reason, first=False):
        if first:  # completions stream no opening chunk
            return None
        return {**self._head(rid), "choices": [{"index": index, "text": text, "finish_reason": reason,
                                                 "logprobs": self._logprobs(tokens, index)}]}

    def usage_chunk(self, rid, usage):
        return {**self._head(rid), "choices": [], "usage": usage}

    def whole(self, rid, texts, tokens, reasons, usage):
        return {**self._head(rid), "choices": [
            {"index": i, "text": t, "finish_reason": r, "logprobs": self._logprobs(k, i)}
            for i, (t, k, r) in enumerate(zip(texts, tokens, reasons))], "usage": usage}


class _ChatShape:
    """/v1/chat/completions' response objects."""

    def __init__(self, model: str, created: int, n: int = 1):
        self.model, self.created, self.n = model, created, n

    def _head(self, rid: str, chunk: bool) -> dict:
        return {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.model}

    def chunk(self, rid, index, text, tokens, reason, first=False):
        if first:  # each choice's role comes first, as OpenAI streams it
            return {**self._head(rid, True), "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(self.n)]}
        delta = {"content": text} if text else {}
        return {**self._head(rid, True), "choices": [{"index": index, "delta": delta,
                                                       "finish_reason": reason}]}

    def usage_chunk(self, rid, usage):
        return {**self._head(rid, True), "choices": [], "usage": usage}

    def whole(self, rid, texts, tokens, reasons, usage):
        return {**self._head(rid, False), "choices": [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))], "usage": usage}


class _CountRequests:
    """Pure ASGI middleware counting answers by path and status (a BaseHTTPMiddleware would
    get in the way of streaming and of noticing disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
