"""The stepping loop with its logging, evaluation and checkpoint cadence.

The hot loop only dispatches: batches are built on the host while the device works, and
metrics stay on the device until a log interval, when they are fetched together.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from tqdm import tqdm

from gptjax import config as C
from gptjax import model
from gptjax.data.prepared import PreparedData
from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.errors import Preempted, RunFailed
from gptjax.parallel import preemption
from gptjax.parallel.distributed import host, one_step_at_a_time
from gptjax.training import layer_stats
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.compiled import CompiledSteps
from gptjax.training.guard import Guard, Spike
from gptjax.training.metrics import MFU_FORMULA, JsonlLog, flops_per_token
from gptjax.training.run_dir import data_fingerprint
from gptjax.training.step import TrainState, mean_loss
from gptjax.training.stop_signals import StopSignals

MAX_ROLLBACKS = 3  # to one checkpoint, before a run that keeps spiking is stopped


class Loop:
    """The stepping loop with its logging, evaluation and checkpoint cadence, and the
    policies of `guard` (non-finite losses, spikes) and `stop_signals`."""

    def __init__(self, cfg: C.RunConfig, data: PreparedData, sampler: WindowSampler,
                 steps: CompiledSteps, ckpts: Checkpoints, log: JsonlLog, progress: bool, echo,
                 stop: StopSignals | None = None, resumed_extra: dict | None = None,
                 on_peak_raised=None):
        m, t = cfg.model, cfg.train
        self.cfg, self.data, self.sampler, self.ckpts, self.log = cfg, data, sampler, ckpts, log
        self.steps, self.stop = steps, stop
        self.say = tqdm.write if progress else echo  # tqdm.write keeps lines clear of the bar
        self.progress = progress
        self.train_step, self.put_batch = steps.train_step, steps.put_batch
        val = [steps.put_batch(lambda rows, b=b: {k: v[rows] for k, v in b.items()}, steps.eval_rows)
               for b in eval_batches(data.val, m.context_length, steps.eval_rows,
                                     t.eval_batches * t.grad_accum)]
        self.evaluate = lambda params: mean_loss(steps.eval_step, params, val)
        self.tokens_per_step = t.batch_size * m.context_length
        self.flops_per_token = flops_per_token(m, model.param_count(m, exclude_position=True))
        self.peak, self.on_peak_raised = t.peak_flops, on_peak_raised
        self._resume_from(resumed_extra or {})
        self.rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it
        echo(f"MFU uses {MFU_FORMULA}; peak {self.peak / 1e12:.3g} TFLOP/s ({t.peak_source})")

    def _resume_from(self, extra: dict) -> None:
        """The data offset (batches skipped after spikes) and the guard's history."""
        self.skipped_batches = int(extra.get("data_position", {}).get("skipped_batches", 0))
        self.guard = Guard(self.cfg.train, extra.get("guard"))

    def run(self, state: TrainState, end: int) -> tuple[TrainState, float | None]:
        """Step from `state` to step `end`; the final state and the last validation loss."""
        t, T = self.cfg.train, self.cfg.model.context_length
        step = shown = int(host(state.step))
        self.log.write({"kind": "peak", "step": step, "peak_flops": self.peak, "source": t.peak_source})
        bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        # pending: device metrics not fetched yet; fetched: host metrics of steps since the
        # last record, already seen by the guard.
        pending, fetched, val_loss, train_loss = [], [], None, None
        clock, untimed, ticks = time.perf_counter(), 0, 0
        check_every = preemption.check_every()
        serial = one_step_at_a_time()

        def fetch_and_check():
            """Fetch pending metrics and let the guard see them: a Spike, or None."""
            nonlocal pending
            first = step - len(pending) + 1
            new = [jax.tree.map(host, m_) for m_ in pending]  # waits for them
            pending = []
            fetched.extend(new)
            # Before the guard, which may stop the run: the statistics leading up to a
            # divergence are the ones worth keeping. A rollback trims those past its
            # checkpoint; a skipped update (on_nonfinite skip) changed nothing to describe.
            for i, m_ in enumerate(new):
                if "stats" in m_ and not bool(m_.get("skipped", False)):
                    self.log.write({"kind": "stats", "step": first + i,
                                    **layer_stats.flatten(m_.pop("stats"))})
            return self.guard.check(first, new)

        try:
            while step < end:
                starts = self.sampler.starts(step + self.skipped_batches)
                batch = self.put_batch(lambda rows: gather(self.data.train, starts[rows], T),
                                       len(starts))
                stats_now = t.stats_every and (step + 1) % t.stats_every == 0
                state, metrics = (self.steps.stats_step if stats_now else self.train_step)(state, batch)
                if serial:
                    jax.block_until_ready((state, metrics))
                pending.append(metrics)
                step += 1
                ticks += 1
                # Every process checks at the same steps and gets the same answer; at the last
                # step the run just finishes. Saved below, as for Ctrl-C.
                if self.stop is not None and step < end and step % check_every == 0 \
                        and preemption.any_process(self.stop.requested is not None):
                    raise Preempted(step, self.stop.reason())
                if ticks == 1:  # keep warm-up out of tokens/s
                    jax.block_until_ready(metrics)
                    clock, untimed = time.perf_counter(), 1
                log_now = step % t.log_every == 0 or step == end
                save_now = step % t.eval_every == 0 or step == end
                spike = fetch_and_check() if log_now or save_now else None
                if spike is not None:
                    state, step = self._roll_back(spike, step)
                    bar.reset(total=end)
                    bar.update(step)
                    fetched, shown, clock, untimed = [], step, time.perf_counter(), 0
                    continue
                if log_now:
                    now = time.perf_counter()
                    rec = self._record(step, fetched, untimed, now - clock)
                    self.log.write(rec)
                    self._report_compiles(step)
                    if not self.progress:  # the bar shows these; without it, a line each
                        self.say(_train_line(rec))
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}",
                                    mfu=f"{100 * (rec['mfu'] or 0):.1f}%", refresh=False)
                    bar.update(step - shown)  # the bar counts finished steps, not dispatched ones
                    shown = step
                    fetched, clock, untimed, train_loss = [], now, 0, rec["loss"]
                if save_now:
                    if not log_now:  # the losses since the last record, ending at this step
                        kept = _applied(fetched)
                        train_loss = float(np.mean([m_["loss"] for m_ in kept])) if kept else None
                    # without the bar, this step's train line was just printed
                    shown_loss = None if log_now and not self.progress else train_loss
                    val_loss = self._evaluate_and_save(state, shown_loss)
                    # Keep evaluation and saving out of tokens/s: the interval's steps so far
                    # ran before the new clock.
                    clock, untimed = time.perf_counter(), len(fetched)
        except KeyboardInterrupt:
            bar.close()
            # A non-finite loss in the steps since the last check raises RunFailed here:
            # nothing non-finite is saved, interrupted or not.
            spike = fetch_and_check() if pending else None
            if fetched:  # keep the interval's losses; its timing is meaningless now
                self.log.write(self._record(step, fetched, len(fetched), 0.0))
            if spike is None and self.ckpts.latest_step() != int(host(state.step)):
                self._evaluate_and_save(state, None)
            raise
        bar.close()
        return state, val_loss

    def _report_compiles(self, step: int) -> None:
        """Anything traced or compiled since the last record goes to the log (a checkpoint's
        first save compiles small eager ops); a retrace of a step itself is said aloud."""
        if not hasattr(self.log, "write_compiles"):
            return
        for r in self.log.write_compiles(step):
            if r.get("retrace") and self.log.compile_log.watched(r["function"]):
                shapes = "; then ".join(r.get("shapes", [])) or "shapes not recorded"
                self.say(f"step {step}: {r['function']} was traced again ({r['traces']}x, "
                         f"{r['trace_s'] + r['compile_s']:.1f}s): {shapes}")

    def _roll_back(self, spike: Spike, step: int) -> tuple[TrainState, int]:
        """Restore the last checkpoint (or the initial state) and skip the batches since."""
        back = self.ckpts.latest_step()
        self.rollbacks[back] = self.rollbacks.get(back, 0) + 1
        if self.rollbacks[back] > MAX_ROLLBACKS:
            raise RunFailed(f"loss spike at step {spike.step} ({spike.loss:.4f}, median "
                            f"{spike.median:.4f}) after {MAX_ROLLBACKS} rollbacks to "
                            f"{'the start' if back is None else f'step {back}'}; stopped")
        skipped = self.skipped_batches
        if back is None:
            state, extra = self.steps.init_state(), {}
        else:
            state, extra = self.ckpts.restore(self.steps.abstract_state, back)
        self._resume_from(extra)
        back = int(host(state.step))
        # The batches of steps back+1 .. spike.step, at the offset they were drawn with.
        self.skipped_batches = skipped + spike.step - back
        self.log.truncate_after(back)
        self.log.write({"kind": "rollback", "step": spike.step, "loss": spike.loss,
                        "median": spike.median, "to_step": back,
                        "skipped_batches": [back + 1 + skipped, spike.step + skipped]})
        self.say(f"step {spike.step}: loss {spike.loss:.4f} is a spike ({spike.loss / spike.median:.1f}x "
                 f"the median {spike.median:.4f}); rolled back to step {back} and skipping "
                 f"{spike.step - back} batch(es)")
        return state, back

    def _evaluate_and_save(self, state: TrainState, train_loss: float | None) -> float:
        step = int(host(state.step))
        val_loss = self.evaluate(state.params)
        ppl = math.exp(min(val_loss, 50))
        self.log.write({"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": ppl})
        head = f"step {step}: " + (f"train loss {train_loss:.4f}, " if train_loss is not None else "")
        self.say(f"{head}val loss {val_loss:.4f}, val perplexity {ppl:.2f}")
        if not math.isfinite(val_loss):
            raise RunFailed(f"non-finite validation loss ({val_loss}) at step {step}; stopped "
                            "without saving it (the checkpoints hold finite values)")
        self.ckpts.save(state, {"config": C.to_dict(self.cfg),
                                "data_position": {"step": step, "skipped_batches": self.skipped_batches},
                                "data": data_fingerprint(self.data), "guard": self.guard.state()},
                        val_loss)
        return val_loss

    def _record(self, step: int, metrics: list[dict], untimed: int, seconds: float) -> dict:
        """One JSONL record for a log interval; `untimed` leading steps ran before the clock."""
        kept = _applied(metrics)
        losses = np.array([m_["loss"] for m_ in kept] or [math.nan], np.float64)
        timed = len(metrics) - untimed
        tok_s = self.tokens_per_step * timed / seconds if timed and seconds > 0 else None
        if tok_s and tok_s * self.flops_per_token > self.peak:
            self._raise_peak(step, tok_s * self.flops_per_token)
        loss = float(losses.mean())
        rec = {"kind": "train", "step": step, "loss": loss, "ppl": math.exp(min(loss, 50)),
               "loss_last": float(losses[-1]), "lr": float(metrics[-1]["lr"]),
               "grad_norm": float(metrics[-1]["grad_norm"]), "tokens_per_s": tok_s,
               "mfu": tok_s * self.flops_per_token / self.peak if tok_s else None,
               "timed_steps": timed}
        if len(kept) < len(metrics):
            rec["skipped_updates"] = len(metrics) - len(kept)
        return rec

    def _raise_peak(self, step: int, achieved: float) -> None:
        """A step ran faster than the peak allows: the peak was too low, not MFU above 100%."""
        old, self.peak = self.peak, achieved
        source = (f"raised to the rate achieved at step {step}, above the {old / 1e12:.3g} "
                  "TFLOP/s in use")
        self.say(f"step {step} ran at {achieved / 1e12:.3g} TFLOP/s, above the peak in use "
                 f"({old / 1e12:.3g}): the peak is raised to it, so MFU reads at most 100%")
        self.log.write({"kind": "peak", "step": step, "peak_flops": achieved, "source": source})
        if self.on_peak_raised is not None:
            self.on_peak_raised(achieved, source)


def _applied(metrics: list[dict]) -> list[dict]:
    """The steps whose update was applied (not skipped for a non-finite loss)."""
    return [m_ for m_ in metrics if not bool(m_.get("skipped", False))]


def _train_line(rec: dict) -> str:
    """A console line for a log interval's record (what the progress bar shows, and lr)."""
    speed = (f", {rec['tokens_per_s']:,.0f} tokens/s, MFU {rec['mfu']:.1%}"
             if rec["tokens_per_s"] else "")
    return f"step {rec['step']}: train loss {rec['loss']:.4f}{speed}, lr {rec['lr']:.2e}"
