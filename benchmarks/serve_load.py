"""Load test of `gptjax serve`: N concurrent streaming clients x M requests each, through
the official openai client over loopback HTTP, against one request at a time, in one run.

The model is a preset with random weights (GPT-2 124M by default: `gpt2`) and the GPT-2
tokenizer (GPTJAX_GPT2_RANKS or --gpt2-ranks), served by a child process with as many
slots as clients (the clients' threads stay in this one, off the server's GIL); one
request at a time is measured on a one-slot server of its own. Every request asks for
--max-tokens tokens at temperature 1 with its own seed (random weights rarely draw
end-of-text, and the usage counts what was generated). Reported: errors, p50/p99 time to
first token and request latency, and aggregate generated tokens/s; the concurrent rate
over the sequential one is the speed-up.

    python benchmarks/serve_load.py --clients 16 --requests 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time

import jax
import openai

from gptjax import config as C
from gptjax import model
from gptjax.bench import provenance
from gptjax.data.tokenizer import GPT2Tokenizer
from gptjax.serve.app import create_app
from gptjax.serve.background import BackgroundServer
from gptjax.serve.engine import Engine
from gptjax.serve.metrics import Metrics
from gptjax.serve.scheduler import Scheduler
from gptjax.serve.served import Served

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 30 GPT-2 tokens


def one_request(client, seed: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model="load", prompt=PROMPT, max_tokens=max_tokens,
                                           seed=seed, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": tokens}


def load(client, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests` requests one after another."""
    def worker(c):
        out = []
        for r in range(requests):
            try:
                out.append(one_request(client, 1000 * c + r, max_tokens))
            except openai.OpenAIError as e:
                out.append({"error": str(e)})
        return out
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(worker, range(clients)) for r in rs]
    seconds = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "seconds": seconds, "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / seconds,
            **{f"{k}_p{q}": _quantile([r[k] for r in ok], q) for k in ("ttft", "latency") for q in (50, 99)}}


def _quantile(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def serve_random(preset: str, slots: int, max_len: int, ranks: str | None) -> None:
    """The server process: a preset with random weights, warmed up, on a free port (its URL
    and warm-up seconds printed as one JSON line), serving until killed. Its own process,
    so the clients' Python does not share a GIL (or the cores' time) with the scheduler's."""
    tokenizer = GPT2Tokenizer(ranks)
    cfg = C.preset(preset, vocab_size=tokenizer.vocab_size)
    served = Served("load", cfg, tokenizer, model.init(cfg, jax.random.PRNGKey(0)), "transcript")
    engine = Engine(served.params, cfg, slots, tokenizer.vocab_size, min(max_len, cfg.context_length))
    t0 = time.perf_counter()
    engine.warm_up()
    metrics = Metrics()
    scheduler = Scheduler(engine, tokenizer, max_queue=4 * slots, metrics=metrics).start()
    server = BackgroundServer(create_app(served, scheduler, metrics))
    print(json.dumps({"url": server.start(), "warm_up_s": time.perf_counter() - t0}), flush=True)
    server.wait()


def measured(args, slots: int, clients: int, requests: int) -> tuple[dict, float]:
    """`load` against a fresh server process with `slots` slots; (results, its warm-up s)."""
    child = [sys.executable, __file__, "--server-child", "--preset", args.preset, "--clients",
             str(slots), "--max-model-len", str(args.max_model_len),
             *(["--gpt2-ranks", args.gpt2_ranks] if args.gpt2_ranks else [])]
    server = subprocess.Popen(child, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the server process exited ({server.wait()})")
        started = json.loads(line)
        client = openai.OpenAI(base_url=f"{started['url']}/v1", api_key="none", max_retries=0,
                               timeout=600)
        one_request(client, 0, 2)  # the HTTP path's first use, out of the timings
        return load(client, clients, requests, args.max_tokens), started["warm_up_s"]
    finally:
        server.kill()
        server.wait(10)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2", choices=list(C.PRESETS))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--sequential", type=int, default=4, help="requests sent one at a time")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=128, help="the servers' --max-model-len "
                   "(at most the preset's context): every step attends over this many columns "
                   "(the prompt is 30 tokens)")
    p.add_argument("--gpt2-ranks", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--results", default=None, help="append the table to this file")
    p.add_argument("--server-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.server_child:
        return serve_random(args.preset, args.clients, args.max_model_len, args.gpt2_ranks)
    # One request at a time on a one-slot server (what serving them one by one costs at
    # best: a wider server's step is wider), then the clients on a server with a slot each.
    single, warm = measured(args, 1, 1, args.sequential)
    many, _ = measured(args, args.clients, args.clients, args.requests)
    speedup = many["tokens_per_s"] / single["tokens_per_s"]

    def ms(x):
        return f"{1000 * x:,.0f}" if x is not None else "-"
    info = provenance.machine_info()
    lines = [f"### serve load: {args.preset} (random weights), 1 slot then {args.clients}, "
             f"--max-model-len {args.max_model_len}, {args.max_tokens} new tokens per request, "
             f"prompt 30 tokens ({info['date']}, {info['cpu']}, "
             f"{info['cores']} cores, jax {info['jax']}; one-slot warm-up compiles {warm:.0f} s)", "",
             "| clients | requests | errors | TTFT p50 ms | TTFT p99 ms | latency p50 ms | "
             "latency p99 ms | tokens/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (single, many):
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {ms(r['ttft_p50'])} | "
                     f"{ms(r['ttft_p99'])} | {ms(r['latency_p50'])} | {ms(r['latency_p99'])} | "
                     f"{r['tokens_per_s']:,.1f} |")
    lines += ["", f"aggregate speed-up at {args.clients} concurrent streams: {speedup:.2f}x "
              "(goal: 5x at 16)", ""]
    provenance.publish({"machine": info, "preset": args.preset, "warm_up_s": warm, "single": single,
                        "concurrent": many, "speedup": speedup}, "\n".join(lines), args.json,
                       args.results)
    if single["errors"] or many["errors"]:
        raise SystemExit(f"{single['errors'] + many['errors']} requests failed")


if __name__ == "__main__":
    main()
