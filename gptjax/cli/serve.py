"""`gptjax serve`: an OpenAI-compatible HTTP server over a run or GPT-2 weights, with
continuous batching (gptjax.serve)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

from gptjax.cli.options import add_checkpoint, add_gpt2_ranks, add_quantize
from gptjax.errors import GptjaxError


def add_parser(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/completions and /v1/chat/completions (streaming with "
        "\"stream\": true), /v1/models, /health and Prometheus /metrics. Requests share the "
        "device by continuous batching: up to --max-batch run at once in slots of one KV "
        "cache, new ones join between decode steps, and the rest wait in a queue of "
        "--max-queue (beyond it: 429). Every prompt bucket and sampling variant compiles "
        "before the port opens, so no request waits for a compile. One JSON line per "
        "request goes to stderr. Needs `pip install 'gptjax[serve]'`.")
    source = sv.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="gptjax run (trained, imported or "
                        "fine-tuned for language; instruction-tuned runs chat in Alpaca's template)")
    source.add_argument("--hf", metavar="DIR_OR_NAME", help="GPT-2 weights in the Hugging Face layout")
    add_checkpoint(sv, when="with --run: ", default=None)
    add_gpt2_ranks(sv)
    sv.add_argument("--host", default="127.0.0.1", metavar="HOST", help="address to listen on (default: "
                    "127.0.0.1; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, metavar="INT",
                    help="port (default: 8000; 0 = any free port, printed at start)")
    sv.add_argument("--model-name", metavar="NAME", help="the model's id in the API (default: "
                    "the run folder's name)")
    sv.add_argument("--max-batch", type=int, default=8, metavar="INT",
                    help="requests decoded together: slots of the KV cache (default: 8)")
    sv.add_argument("--max-model-len", type=int, metavar="INT", help="most tokens a request "
                    "may hold, prompt and answer (default: the model's context). Every decode "
                    "step attends over this many cache columns of every slot, so short requests "
                    "decode faster under a smaller value")
    sv.add_argument("--max-queue", type=int, default=64, metavar="INT",
                    help="requests that may wait for a slot before the server answers 429 (default: 64)")
    sv.add_argument("--truncate", action="store_true", help="keep the end of a prompt too "
                    "long for the context instead of answering 400")
    sv.add_argument("--api-key-env", metavar="VAR", help="require `Authorization: Bearer KEY` "
                    "on /v1/, KEY read from this environment variable")
    sv.add_argument("--log-prompts", action="store_true", help="include prompts in the request "
                    "log lines (off: prompts stay private)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="INT",
                    help="largest request body (default: 1 MiB; beyond it: 413)")
    sv.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast weights and compute "
                    "(default: as stored)")
    add_quantize(sv, "serve")


def run(args) -> int:
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body_bytes < 1:
        raise GptjaxError("--max-batch and --max-body-bytes must be positive, --max-queue at least 0")
    if not 0 <= args.port <= 65535:
        raise GptjaxError(f"--port {args.port}: ports are 0..65535")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise GptjaxError(f"--api-key-env {args.api_key_env}: that environment variable is "
                              "empty or unset")
    if args.hf and args.checkpoint:
        raise GptjaxError("--checkpoint picks a checkpoint of a --run; --hf folders have none")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise GptjaxError(f"gptjax serve needs {e.name}: pip install 'gptjax[serve]'") from None
    sock = _bind(args.host, args.port)  # before loading: a port in use fails at once
    from gptjax.serve.app import Options, create_app
    from gptjax.serve.engine import Engine
    from gptjax.serve.metrics import Metrics
    from gptjax.serve.scheduler import Scheduler
    from gptjax.serve.served import load_served

    served = load_served(args.run, args.hf, args.checkpoint or "latest", args.gpt2_ranks, args.dtype,
                         args.model_name, args.quantize, args.quant_group)
    engine = Engine(served.params, served.config, args.max_batch, served.tokenizer.vocab_size,
                    args.max_model_len)
    print(f"gptjax serve: compiling for {args.max_batch} slots of {engine.max_len} tokens ...",
          file=sys.stderr, flush=True)
    engine.warm_up()
    metrics = Metrics()
    scheduler = Scheduler(engine, served.tokenizer, max_queue=args.max_queue, metrics=metrics).start()
    app = create_app(served, scheduler, metrics, Options(api_key, args.log_prompts, args.truncate,
                                                         args.max_body_bytes))
    _log_requests_to_stderr()
    host, port = sock.getsockname()[:2]
    print(f"gptjax serve: {served.name} on http://{host}:{port}/v1 ({served.template} chat "
          "template); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        scheduler.stop()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GptjaxError(f"port {port} on {host} is in use; pick another --port") from None
        raise GptjaxError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def _log_requests_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("gptjax.serve.requests", "gptjax.serve"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


COMMANDS = {"serve": run}
