"""Checkpoints through orbax's CheckpointManager.

Each checkpoint holds four items: "params" (the model parameters), "train" (optimizer
state, step and RNG key), "extra" (JSON: the run config, the data position and the
validation loss) and "checksums" (SHA-256 of every array's bytes and of "extra",
`integrity`), all in one atomic commit. Every restore verifies what it read against
"checksums": a damaged checkpoint raises CheckpointDamaged naming the first bad leaf, and
restoring "the latest" may fall back to the newest one that verifies. Checkpoints written
before checksums existed load unverified, with a warning.

Parameters are their own item so inference and fine-tuning can restore
them without the optimizer state, which is twice their size; imported weights are saved
with no "train" item at all (`save_params`): loadable, not resumable. Orbax writes into a
temporary folder and renames it when complete, so an interrupted save never leaves a
half-written checkpoint; `close()` waits for pending asynchronous saves, which a normal
exit must not skip. The most recent `keep` checkpoints are preserved, plus the one with
the lowest validation loss.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import CheckpointDamaged, GptjaxError, RunFailed
from gptjax.training import integrity
from gptjax.training.orbax_quiet import DropMessages, drop_reports_of_abandoned_reads, quiet_failed_writes
from gptjax.training.step import TrainState

ITEMS = ("params", "train", "extra", "checksums")
# Recorded in "extra" so that a checkpoint whose "checksums" item went missing is damaged,
# not mistaken for one written before checksums existed.
INTEGRITY_KEY = "integrity"
_warned_unverified: set[str] = set()


def _val_loss(metrics) -> float:
    return metrics["val_loss"]


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """A run's checkpoints folder. With `set_aside` (a function told of each move), a
    writer moves damaged checkpoints out of the way into a sibling folder
    `damaged-checkpoints/` (nothing is deleted), so that the run can resume from the newest
    good one and later save over the same step numbers."""

    def __init__(self, directory: Path, keep: int = 3, create: bool = True, set_aside=None,
                 keep_best: bool = True):
        kept = [policies.LatestN(n=keep)]
        if keep_best:  # else only the latest `keep`: a fine-tuning run's resume state
            kept.append(policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                       keep_checkpoints_without_metrics=False))
        self._options = ocp.CheckpointManagerOptions(
            best_fn=_val_loss if keep_best else None, best_mode="min", create=create,
            preservation_policy=policies.AnyPreservationPolicy(kept),
        )
        self.directory = Path(directory).absolute()
        self._set_aside = set_aside
        quiet_failed_writes()
        self._open()

    def _open(self) -> None:
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=self._options,
                                              item_names=ITEMS)
        except Exception as e:  # noqa: BLE001  orbax reads every step's metrics file here
            step = _step_with_unreadable_metrics(self.directory)
            if step is None:
                raise
            damaged = CheckpointDamaged(
                f"checkpoint {step} in {self.directory} is damaged: its metrics file cannot "
                f"be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            if self._set_aside is None:
                raise CheckpointDamaged(f"{damaged}; move it out of the folder "
                                        f"(mv {self.directory / str(step)} ...) to use the others") from None
            self._move_aside(step, damaged)
            return self._open()
        # orbax would ask JAX's preemption service, which gptjax turns off (stops are agreed
        # by parallel.preemption); saves here are forced, so it needs the answer for nothing.
        self._mgr.reached_preemption = lambda step: False

    def _move_aside(self, step: int, damaged: CheckpointDamaged) -> None:
        aside = self.directory.parent / "damaged-checkpoints"
        aside.mkdir(exist_ok=True)
        target = aside / str(step)
        n = 1
        while target.exists():
            target, n = aside / f"{step}-{n}", n + 1
        os.replace(self.directory / str(step), target)
        self._set_aside(damaged, target)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, state: TrainState, extra: dict, val_loss: float | None) -> None:
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        extra = {**extra, INTEGRITY_KEY: integrity.ALGORITHM}
        sums = _checksums({"params": state.params, "train": train}, extra)
        self._write(int(state.step), (state.params, train), lambda: self._mgr.save(
            int(state.step), args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
                extra=ocp.args.JsonSave(extra), checksums=ocp.args.JsonSave(sums)),
            metrics=None if val_loss is None else {"val_loss": float(val_loss)}, force=True))

    def save_params(self, step: int, params, extra: dict) -> None:
        """Parameters and JSON extra only (imported weights): restorable, not resumable."""
        # No validation loss exists yet; orbax would warn that none was given.
        quiet = DropMessages(("did not provide metrics",))
        logging.getLogger("absl").addFilter(quiet)
        extra = {**extra, INTEGRITY_KEY: integrity.ALGORITHM}
        sums = _checksums({"params": params}, extra)
        try:
            self._write(int(step), params, lambda: self._mgr.save(int(step), args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), extra=ocp.args.JsonSave(extra),
                checksums=ocp.args.JsonSave(sums)), force=True))
        finally:
            logging.getLogger("absl").removeFilter(quiet)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self._mgr.all_steps():
            have = self.all_steps()
            listed = f"; it has {', '.join(map(str, have))}" if have else ""
            raise GptjaxError(f"no checkpoint{'' if step is None else f' {step}'} in "
                              f"{self.directory}{listed}")
        return step

    def restore(self, abstract_state: TrainState, step: int | None = None,
                fallback=None) -> tuple[TrainState, dict]:
        """The whole TrainState at `step` (default: latest), shaped and sharded like the
        target, verified against its checksums. With `fallback` (a function told of each
        damaged checkpoint and the step tried next), a damaged latest checkpoint gives way
        to the newest one that verifies; an explicit `step` never falls back."""
        train = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "rng": abstract_state.rng}
        args = {"params": ocp.args.StandardRestore(_abstract(abstract_state.params)),
                "train": ocp.args.StandardRestore(_abstract(train))}
        out, _ = self._newest_good(step, fallback, lambda s: self._verified_read(s, args))
        t = out["train"]
        return TrainState(t["step"], out["params"], t["opt_state"], t["rng"]), out["extra"]

    def restore_params(self, abstract_params, step: int | None = None,
                       fallback=None) -> tuple[dict, int]:
        """Only the parameters (no optimizer state is read), verified: for inference and
        fine-tuning. `fallback` as for `restore`."""
        args = {"params": ocp.args.StandardRestore(_abstract(abstract_params))}
        out, step = self._newest_good(step, fallback, lambda s: self._verified_read(s, args))
        return out["params"], step

    def verify(self, step: int) -> None:
        """Read a whole checkpoint onto one device, as saved, and verify it
        (CheckpointDamaged if it does not)."""
        step = self._step(step)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        args = {}
        for name in ("params", "train"):
            if (self.directory / str(step) / name).is_dir():
                quiet = DropMessages(("Metadata file does not exist", "Failed to get item metadata"))
                try:  # orbax's notes about a layout it reads all the same
                    logging.getLogger("absl").addFilter(quiet)
                    meta = ocp.StandardCheckpointer().metadata(self.directory / str(step) / name)
                    meta = getattr(meta, "item_metadata", meta)
                    shapes = jax.tree.map(
                        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
                except Exception as e:  # noqa: BLE001  unreadable metadata is damage too
                    raise self._unreadable(step, e) from None
                finally:
                    logging.getLogger("absl").removeFilter(quiet)
                args[name] = ocp.args.StandardRestore(shapes)
        self._verified_read(step, args)

    def _newest_good(self, step: int | None, fallback, read):
        self._mgr.wait_until_finished()  # a save of this object's still in flight is readable
        if step is None and self._set_aside is not None:
            return self._newest_after_setting_aside(read)
        if step is not None or fallback is None:
            step = self._step(step)
            return read(step), step
        candidates = sorted(self._mgr.all_steps(), reverse=True)
        if not candidates:
            self._step(None)  # raises: no checkpoint
        for i, s in enumerate(candidates):
            try:
                return read(s), s
            except CheckpointDamaged as e:
                following = candidates[i + 1] if i + 1 < len(candidates) else None
                if following is None:
                    raise CheckpointDamaged(f"{e}; no other checkpoint in {self.directory} "
                                            "verifies either") from None
                fallback(e, following)
        raise AssertionError("unreachable")

    def _newest_after_setting_aside(self, read):
        while True:
            step = self._step(None)
            try:
                return read(step), step
            except CheckpointDamaged as e:
                self._mgr.close()
                self._move_aside(step, e)
                self._open()

    def _verified_read(self, step: int, arrays: dict) -> dict:
        """Restore `arrays` (item name -> restore args) with "extra", and check them."""
        where = self.directory / str(step)
        args = {**arrays, "extra": ocp.args.JsonRestore()}
        has_sums = (where / "checksums").is_dir()
        if has_sums:
            args["checksums"] = ocp.args.JsonRestore()
        missing = [name for name in arrays if not (where / name).is_dir()]
        if missing:
            raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged: "
                                    f"its {missing[0]!r} item is missing")
        out = dict(self._read(step, ocp.args.Composite(**args)).items())
        extra = out["extra"]
        if not has_sums:
            if INTEGRITY_KEY in extra:
                raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged: "
                                        "its checksums are missing")
            _warn_unverified(self.directory, step)
            return out
        sums = out["checksums"]
        bad = None
        if sums.get("extra") != integrity.json_digest(extra):
            bad = "extra"
        else:
            trees = {"params": out["params"]} if "params" in out else {}
            if "train" in out:
                trees["train"] = out["train"]
            bad = integrity.first_mismatch(trees, sums)
        if bad is not None:
            raise CheckpointDamaged(f"checkpoint {step} in {self.directory} is damaged: "
                                    f"{bad} does not match its checksum")
        out["extra"] = {k: v for k, v in extra.items() if k != INTEGRITY_KEY}
        return out

    def _read(self, step: int, args):
        drop_reports_of_abandoned_reads()  # before: some arrive while orbax unwinds
        with warnings.catch_warnings():
            # When one read fails, orbax abandons the others: their coroutines are finalised
            # with "never awaited" warnings that add nothing to the error below.
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            try:
                return self._mgr.restore(step, args=args)
            except Exception as e:  # noqa: BLE001  orbax raises a bare Exception; sorted here
                problem = self._unreadable(step, e)
            gc.collect()  # finalise them now, while their warning is filtered
        raise problem from None

    def _unreadable(self, step: int, e: Exception) -> GptjaxError:
        """The one-line error for a checkpoint that cannot be restored: a target of another
        shape, or else damage (any file of a checkpoint can be truncated, flipped or gone,
        and each breaks orbax or tensorstore in its own way). orbax's exception is chained
        to tensorstore's, whose first line names the file."""
        cause = e.__cause__ or e
        text = str(cause)
        first = (text.strip().splitlines() or [type(cause).__name__])[0][:300]
        where = f"checkpoint {step} in {self.directory}"
        if "not compatible with the stored shape" in text or "tree structures do not match" in text:
            return GptjaxError(f"{where} does not match this model's parameters or optimizer "
                               f"state ({first})")
        files = re.findall(r'local file "([^"]+)"', text)
        code = re.match(r"([A-Z_]{4,}): ", first)
        if files and code:  # tensorstore's: "DATA_LOSS: Error opening ... local file "...": ..."
            return CheckpointDamaged(f"{where} is damaged: {files[-1]} cannot be read ({code[1]})")
        return CheckpointDamaged(f"{where} is damaged: it cannot be read ({type(cause).__name__}: "
                                 f"{first[:200]})")

    def _write(self, step: int, arrays, save) -> None:
        """Run orbax's `save` for `step`, turning a failed write into one RunFailed line.

        orbax writes in background threads and reports a failure at the next save or at
        close, after logging it with tracebacks from each thread; those logs are dropped
        (`_quiet_failed_writes`) and the error is raised here instead. A save that cannot
        fit in the free space is refused before anything is written."""
        if jax.process_count() == 1:
            need = sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(arrays))
            need = int(need * 1.05) + (256 << 10)  # orbax's metadata files, roughly
            free = shutil.disk_usage(self.directory).free
            if free < need:
                self.close()  # earlier saves finish (or fail, and say so) first
                raise RunFailed(f"not enough space for checkpoint {step} in {self.directory}: "
                                f"it needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are "
                                f"free; the checkpoints before it are intact{self._others()}")
        try:
            save()
        except Exception as e:  # noqa: BLE001  orbax re-raises its threads' errors as they were
            raise self._write_failed(e) from None

    def _write_failed(self, e: Exception) -> RunFailed:
        chain, cause = [], e
        while cause is not None and len(chain) < 10:  # orbax wraps the thread's error
            chain.append(cause)
            cause = cause.__cause__
        text = "\n".join(str(c) for c in chain)
        files = re.findall(r'(?:local file|Failed writing:) "([^"]+)"', text)
        named = next((c.filename for c in chain if getattr(c, "filename", None)), None)
        what = files[-1] if files else named or self.directory
        reason = next((c.strerror for c in chain if getattr(c, "strerror", None)), None)
        if reason is None and ("RESOURCE_EXHAUSTED" in text or "No space left" in text):
            reason = "No space left on device"
        elif reason is None and "Read-only file system" in text:
            reason = "Read-only file system"
        reason = reason or (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[0]
        try:  # saves still in flight finish first: their temporary folders are not debris
            self._mgr.wait_until_finished()
        except Exception:  # noqa: BLE001  the same failure, or another of the same kind
            pass
        self._remove_partial()
        where = "" if Path(what) == self.directory else f" ({what})"
        return RunFailed(f"cannot write a checkpoint in {self.directory}{where}: {reason[:200]}; "
                         f"its partial files were removed, the checkpoints before it are "
                         f"intact{self._others()}")

    def _others(self) -> str:
        steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
        return f" (steps {', '.join(map(str, steps))})" if steps else " (there are none yet)"

    def remove_partial(self) -> None:
        """Temporary folders of saves that never completed (a killed writer's), for a
        writer holding the run's lock (run_lock): nothing else can be saving into them."""
        self._remove_partial()

    def _remove_partial(self) -> None:
        """A failed save's temporary folders: this process is the run's only writer
        (run_lock), so every one of them is its own."""
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def discard(self, step: int) -> None:
        """Delete checkpoint `step` (a fine-tuning run's best saved past its resume point)."""
        self.wait()
        self._mgr.delete(step)

    def wait(self) -> None:
        """Block until every pending save is on disk (or raise its failure as RunFailed)."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001  a background write failed; see _write
            raise self._write_failed(e) from None

    def close(self) -> None:
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001  a background write failed; see _write
            self._mgr.close()
            raise self._write_failed(e) from None
        self._mgr.close()


def _step_with_unreadable_metrics(directory: Path) -> int | None:
    """The first step whose orbax metrics file is not JSON (orbax then opens no step)."""
    for path in sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        metrics = path / "metrics" / "metrics"
        try:
            if metrics.exists():
                json.loads(metrics.read_text())
        except (ValueError, UnicodeDecodeError):
            return int(path.name)
    return None


def _checksums(trees: dict, extra: dict) -> dict:
    return {**integrity.digests(trees), "extra": integrity.json_digest(extra)}


def forget_unverified_warning(directory: Path) -> None:
    """Warn again for this directory (`check_run` reports every unverified checkpoint)."""
    _warned_unverified.discard(str(directory))


def _warn_unverified(directory: Path, step: int) -> None:
    """Once per run directory: its checkpoints predate checksums and load unchecked."""
    if str(directory) not in _warned_unverified:
        _warned_unverified.add(str(directory))
        warnings.warn(f"checkpoint {step} in {directory} has no checksums (written before "
                      "gptjax recorded them); it is loaded unverified", stacklevel=3)
