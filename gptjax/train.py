"""The training loop: set up or resume a run, step, log, evaluate, checkpoint, sample.

The hot loop only dispatches: batches are built on the host while the device works, and
metrics stay on the device until a log interval, when they are fetched together.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gptjax import config as C
from gptjax import model, optim, run
from gptjax.checkpoint import Checkpoints
from gptjax.data import WindowSampler, eval_batches, gather
from gptjax.errors import GptjaxError
from gptjax.generate import generate
from gptjax.metrics import MFU_FORMULA, JsonlLog, flops_per_token, peak_flops, plot_losses
from gptjax.train_step import TrainState, init_state, make_eval_step, make_train_step


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    sample: str = ""
    files: dict = field(default_factory=dict)


def _setup(cfg: C.RunConfig, out: Path, progress: bool):
    """Validate everything and open the data; creates `out` only for a new run."""
    C.validate(cfg)
    resuming = run.check_out_dir(out)
    created = not out.exists()
    try:
        data = run.training_data(cfg, out, resuming, progress)
        cfg = run.resolve(cfg, data)
        if resuming:
            run.check_resume(out, cfg, data)
        t, T = cfg.train, cfg.model.context_length
        sampler = _sampler(data.train, T, t, f"training split of {data.path}")
        _sampler(data.val, T, t, f"validation split of {data.path}")
        if not resuming:
            run.create(out, cfg, data)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return cfg, data, sampler, resuming


def _sampler(tokens, context, t: C.TrainConfig, what: str) -> WindowSampler:
    try:
        return WindowSampler(len(tokens), context, t.batch_size, t.sampler, t.stride, t.seed)
    except GptjaxError as e:
        raise GptjaxError(f"{what}: {e}; use a larger corpus or a smaller --context-length") from None


def train(cfg: C.RunConfig, out_dir: str | Path, *, stop_at: int | None = None,
          progress: bool = True, echo=print) -> TrainResult:
    """Train (or resume) the run in `out_dir` until max_steps, or until step `stop_at`."""
    out = Path(out_dir)
    cfg, data, sampler, resuming = _setup(cfg, out, progress)
    m, t = cfg.model, cfg.train
    tokenizer = data.tokenizer(cfg.data.gpt2_ranks or None)
    log = JsonlLog(out / "metrics.jsonl")
    tx = optim.optimizer(t)
    train_step = jax.jit(make_train_step(m, t, tx), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(m))
    val_batches = [jax.tree.map(jnp.asarray, b)
                   for b in eval_batches(data.val, m.context_length, t.batch_size, t.eval_batches)]

    def evaluate(params) -> float:
        sums = [eval_step(params, b) for b in val_batches]
        total, count = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))
        return float(total / count)

    ckpts = Checkpoints(out / "checkpoints", keep=t.keep_checkpoints)
    try:
        state = init_state(m, t, tx)
        if resuming and ckpts.latest_step() is not None:
            state, extra = ckpts.restore(jax.eval_shape(lambda: state), None)
            _check_data_position(extra, data, int(state.step))
            _truncate_log(log, int(state.step))
            echo(f"resuming {out} from step {int(state.step)}")
        n_params = model.param_count(m)
        echo(f"model: {n_params:,} parameters | data: {data.meta['train_tokens']:,} train / "
             f"{data.meta['val_tokens']:,} val tokens ({cfg.data.tokenizer}) | run: {out}")
        end = min(t.max_steps, stop_at or t.max_steps)
        val_loss = _loop(state, end, cfg, data, sampler, train_step, evaluate, ckpts, log,
                         n_params, progress, echo) if int(state.step) < end else None
    finally:
        ckpts.close()
    return _finish(out, cfg, tokenizer, val_loss, log, echo)


def _loop(state: TrainState, end: int, cfg, data, sampler, train_step, evaluate, ckpts, log,
          n_params, progress, echo) -> float:
    m, t = cfg.model, cfg.train
    step = int(state.step)
    tokens_per_step = t.batch_size * m.context_length
    flops_tok = flops_per_token(m, n_params - m.context_length * m.d_model)
    peak, peak_src = peak_flops(t.peak_flops)
    echo(f"MFU uses {MFU_FORMULA}; peak {peak / 1e12:.3g} TFLOP/s ({peak_src})")
    bar = tqdm(total=end, initial=step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    pending, val_loss = [], None
    fingerprint = run.data_fingerprint(data)
    t_last, compiled, untimed = time.perf_counter(), False, 0
    try:
        while step < end:
            batch = gather(data.train, sampler.starts(step), m.context_length)
            state, metrics = train_step(state, batch)
            pending.append(metrics)
            step += 1
            bar.update()
            if not compiled:  # the only per-step sync: time compilation apart
                jax.block_until_ready(metrics)
                tqdm.write(f"compiled and ran the first step in {time.perf_counter() - t_last:.1f}s")
                t_last, compiled, untimed = time.perf_counter(), True, 1
            if pending and (step % t.log_every == 0 or step == end):
                fetched = jax.device_get(pending)  # waits for the interval's steps
                now = time.perf_counter()
                rec = _train_record(step, fetched, untimed, tokens_per_step, now - t_last,
                                    flops_tok, peak)
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}",
                                mfu=f"{100 * (rec['mfu'] or 0):.1f}%")
                pending, t_last, untimed = [], now, 0
            if step % t.eval_every == 0 or step == end:
                val_loss = evaluate(state.params)
                log.write({"kind": "eval", "step": step, "val_loss": val_loss,
                           "val_ppl": math.exp(min(val_loss, 50))})
                tqdm.write(f"step {step}: val loss {val_loss:.4f}, perplexity "
                           f"{math.exp(min(val_loss, 50)):.2f}")
                ckpts.save(state, {"config": C.to_dict(cfg), "data_position": {"step": step},
                                   "data": fingerprint}, val_loss)
                t_last = time.perf_counter()  # keep eval time out of tokens/s
    except KeyboardInterrupt:
        bar.close()
        val_loss = evaluate(state.params)
        ckpts.save(state, {"config": C.to_dict(cfg), "data_position": {"step": int(state.step)},
                           "data": fingerprint}, val_loss)
        raise
    bar.close()
    return val_loss


def _train_record(step, metrics: list[dict], untimed: int, tokens_per_step, seconds, flops_tok,
                  peak) -> dict:
    """One JSONL record for a log interval; `untimed` leading steps ran before the clock."""
    losses = np.array([m_["loss"] for m_ in metrics], np.float64)
    timed = len(metrics) - untimed
    tok_s = tokens_per_step * timed / seconds if timed and seconds > 0 else None
    loss = float(losses.mean())
    return {"kind": "train", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50)),
            "loss_last": float(losses[-1]), "lr": float(metrics[-1]["lr"]),
            "grad_norm": float(metrics[-1]["grad_norm"]), "tokens_per_s": tok_s,
            "mfu": tok_s * flops_tok / peak if tok_s else None}


def _check_data_position(extra: dict, data, step: int) -> None:
    if extra.get("data") != run.data_fingerprint(data):
        raise GptjaxError(f"checkpoint at step {step} was trained on different data "
                          f"({extra.get('data')}); refusing to resume on {data.path}")
    if extra.get("data_position", {}).get("step") != step:
        raise GptjaxError(f"checkpoint data position {extra.get('data_position')} does not "
                          f"match its step {step}")


def _truncate_log(log: JsonlLog, step: int) -> None:
    """Drop records written after the checkpoint we resume from (they will be redone)."""
    kept = [r for r in log.read() if r.get("step", 0) <= step]
    tmp = log.path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(log.path)


def _finish(out: Path, cfg, tokenizer, val_loss, log, echo) -> TrainResult:
    loaded = run.load(out, "latest", cfg.data.gpt2_ranks or None)
    result = TrainResult(out, loaded.step, val_loss)
    if loaded.step < cfg.train.max_steps:
        echo(f"stopped at step {loaded.step} of {cfg.train.max_steps}; "
             f"run `gptjax train --out {out}` to continue")
    if cfg.train.sample_tokens:
        ids = generate(loaded.params, cfg.model, [], cfg.train.sample_tokens, seed=cfg.train.seed,
                       temperature=0.8, top_k=40, valid_vocab=tokenizer.vocab_size,
                       eot_id=tokenizer.eot_id)
        result.sample = tokenizer.decode(ids)
        (out / "sample.txt").write_text(result.sample)
        result.files["sample"] = out / "sample.txt"
        echo("sample (temperature 0.8, top-k 40):\n" + result.sample.strip() + "\n")
    result.files["loss curve"] = plot_losses(log.read(), out / "loss.png")
    result.files["metrics"] = log.path
    result.files["checkpoints"] = out / "checkpoints"
    result.files["config"] = out / "config.json"
    for what, path in result.files.items():
        echo(f"{what:>12}: {path}")
    return result
