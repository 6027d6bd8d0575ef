"""Compile time of the train step in a fresh Python process, with or without JAX's
persistent compilation cache: in-process, jit's own caches and already-imported code
would flatter the second compile.

    python -m gptjax.bench.compile --model JSON [--train JSON] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import jax

from gptjax.bench.timing import CACHE_HIT_EVENT
from gptjax.bench.train_step import build_train_step
from gptjax.config import ModelConfig, TrainConfig


def compile_in_subprocess(model_cfg: ModelConfig, train_cfg: TrainConfig,
                          cache_dir: str | None = None, timeout: float = 1800) -> dict:
    """Lower + compile the train step in a new Python process (optionally with JAX's
    persistent compilation cache in `cache_dir`); its timings as a dict."""
    cmd = [sys.executable, "-m", "gptjax.bench.compile",
           "--model", json.dumps(dataclasses.asdict(model_cfg)),
           "--train", json.dumps(dataclasses.asdict(train_cfg))]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"compile subprocess failed ({proc.returncode}): {tail}")
    return {**json.loads(lines[-1]), "process_seconds": wall}


def _compile_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m gptjax.bench.compile")
    ap.add_argument("--model", required=True, help="ModelConfig fields as JSON")
    ap.add_argument("--train", default="{}", help="TrainConfig fields as JSON")
    ap.add_argument("--cache-dir", help="use JAX's persistent compilation cache here")
    args = ap.parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    hits = []

    def on_event(event, **kwargs):
        if event == CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    bench = build_train_step(ModelConfig(**json.loads(args.model)), TrainConfig(**json.loads(args.train)))
    print(json.dumps({"lower_seconds": bench.lower_seconds, "compile_seconds": bench.compile_seconds,
                      "seconds": bench.lower_seconds + bench.compile_seconds,
                      "cache": bool(args.cache_dir), "cache_hits": len(hits),
                      "memory": bench.memory}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_compile_main(sys.argv[1:]))
