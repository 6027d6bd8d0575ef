"""Batch inference: a JSONL file of prompts through the continuous-batching scheduler,
answers appended to a JSONL file as each finishes, resumable.

Input records are {"id": ..., "prompt": "..."} (id: a string or an integer, unique; a
record without one gets its line number). Output records are {"id", "text",
"finish_reason", "prompt_tokens", "completion_tokens"}, in the order they finish. A run
that stops part-way (Ctrl-C, a crash, a full disk) leaves whole lines behind it: run the
same command again and it drops a cut last line and continues with the first id that has
no answer. Record i samples with seed + i, so a resumed file is the file an uninterrupted
run would have written, line order aside.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gptjax.errors import GptjaxError
from gptjax.serve.engine import Engine
from gptjax.serve.scheduler import Request, Scheduler
from gptjax.serve.served import Served


@dataclass(frozen=True)
class BatchSettings:
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_at_eot: bool = True


def read_prompts(path: str | Path) -> list[tuple[object, str]]:
    """[(id, prompt)] of a JSONL file, checked: one line, naming the line, for a bad record."""
    out, seen = [], set()
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptjaxError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise GptjaxError(f"{path}:{n}: a record needs a \"prompt\" string")
            rid = record.get("id", n)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise GptjaxError(f"{path}:{n}: \"id\" must be a string or an integer")
            if rid in seen:
                raise GptjaxError(f"{path}:{n}: id {rid!r} repeats an earlier record's")
            seen.add(rid)
            out.append((rid, record["prompt"]))
    if not out:
        raise GptjaxError(f"{path}: no prompts")
    return out


def answered(path: Path) -> set:
    """Ids already in the output; a last line cut short by a crash is removed first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(whole))
    ids = set()
    for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GptjaxError(f"{path}:{n}: not an answer this command wrote; give a new "
                              "--output") from None
    return ids


def run_batch(served: Served, inputs: str | Path, output: str | Path, settings: BatchSettings,
              slots: int = 8, progress: bool = True) -> int:
    """Answer every prompt of `inputs` not yet in `output`; returns how many were answered now."""
    prompts = read_prompts(inputs)
    output = Path(output)
    done = answered(output)
    todo = [(i, rid, text) for i, (rid, text) in enumerate(prompts) if rid not in done]
    ctx, tok = served.config.context_length, served.tokenizer
    if settings.max_tokens < 1:
        raise GptjaxError("batch inference needs --max-new-tokens of at least 1")
    if settings.max_tokens >= ctx:
        raise GptjaxError(f"--max-new-tokens {settings.max_tokens} leaves no room for a prompt in "
                          f"the context of {ctx}")
    encoded = [(i, rid, tok.encode(text) or [tok.eot_id]) for i, rid, text in todo]
    room = ctx - settings.max_tokens
    # The cache as long as the longest request of the whole file needs (every step reads
    # all of it), the same on a resume: the same shapes give the same numbers.
    longest = max(min(len(tok.encode(text) or [0]), room) for _, text in prompts)
    longest += settings.max_tokens
    cut = sum(len(ids) > room for _, _, ids in encoded)
    if cut:
        warnings.warn(f"{cut} prompt(s) are longer than the context leaves beside "
                      f"--max-new-tokens {settings.max_tokens}; they keep their last {room} tokens")
    if not encoded:
        return 0
    engine = Engine(served.params, served.config, min(slots, len(prompts)), tok.vocab_size,
                    min(longest, ctx))
    scheduler = Scheduler(engine, tok, max_queue=len(encoded)).start()
    finished = threading.Semaphore(0)
    lock = threading.Lock()
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as out, \
            tqdm(total=len(prompts), initial=len(prompts) - len(encoded), desc="generate",
                 unit="prompt", disable=not progress) as bar:
        failures: list[str] = []

        def sink_for(rid, prompt_tokens):
            text = []

            def on_event(kind, data):
                if kind == "text":
                    text.append(data[0])
                    return
                try:
                    with lock:
                        if kind == "error":
                            failures.append(data)
                        else:
                            out.write(json.dumps({"id": rid, "text": "".join(text),
                                                  "finish_reason": data, "prompt_tokens": prompt_tokens,
                                                  "completion_tokens": request_of[rid].completion_tokens})
                                      + "\n")
                            out.flush()
                            bar.update()
                except OSError as e:  # a full disk: this answer is lost, the run stops
                    failures.append(f"cannot write {output}: {e.strerror or e}")
                finally:
                    finished.release()  # whatever happened, the waiting loop hears of it
            return on_event

        request_of = {}
        try:
            for i, rid, ids in encoded:
                ids = ids[-room:]
                request_of[rid] = Request(ids, settings.max_tokens, sink_for(rid, len(ids)),
                                          temperature=settings.temperature, top_k=settings.top_k,
                                          top_p=settings.top_p, seed=(settings.seed + i) % 2**32,
                                          stop=settings.stop, stop_at_eot=settings.stop_at_eot)
                scheduler.submit(request_of[rid])
            for _ in encoded:
                finished.acquire()
        finally:
            scheduler.stop()
            os.fsync(out.fileno())
    if failures:
        raise GptjaxError(f"{len(failures)} prompt(s) failed: {failures[0]}")
    return len(encoded)
