"""Checkpoints through orbax's CheckpointManager.

Each checkpoint holds three items: "params" (the model parameters), "train" (optimizer
state, step and RNG key) and "extra" (JSON: the run config, the data position and the
validation loss). Parameters are their own item so inference and fine-tuning can restore
them without the optimizer state, which is twice their size; imported weights are saved
with no "train" item at all (`save_params`): loadable, not resumable. Orbax writes into a
temporary folder and renames it when complete, so an interrupted save never leaves a
half-written checkpoint; `close()` waits for pending asynchronous saves, which a normal
exit must not skip. The most recent `keep` checkpoints are preserved, plus the one with
the lowest validation loss.
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import GptjaxError
from gptjax.training.step import TrainState

ITEMS = ("params", "train", "extra")


def _val_loss(metrics) -> float:
    return metrics["val_loss"]


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 3, create: bool = True):
        options = ocp.CheckpointManagerOptions(
            best_fn=_val_loss, best_mode="min", create=create,
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
        )
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        # JAX's preemption protocol takes each process's latest step id as given; orbax would
        # also report saved steps (from its finalising thread, later, on process 0 only) and
        # pull process 0 back. The training loop alone reports (train._preemption_check);
        # saves here are forced, so orbax needs the answer for nothing else.
        self._mgr.reached_preemption = lambda step: False

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, state: TrainState, extra: dict, val_loss: float) -> None:
        train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self._mgr.save(int(state.step), args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
            extra=ocp.args.JsonSave(extra)), metrics={"val_loss": float(val_loss)}, force=True)

    def save_params(self, step: int, params, extra: dict) -> None:
        """Parameters and JSON extra only (imported weights): restorable, not resumable."""
        # No validation loss exists yet; orbax would warn that none was given.
        quiet = _DropMessage("did not provide metrics")
        logging.getLogger("absl").addFilter(quiet)
        try:
            self._mgr.save(int(step), args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), extra=ocp.args.JsonSave(extra)), force=True)
        finally:
            logging.getLogger("absl").removeFilter(quiet)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self._mgr.all_steps():
            raise GptjaxError(f"no checkpoint{'' if step is None else f' {step}'} in {self.directory}")
        return step

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The whole TrainState at `step` (default: latest), shaped and sharded like the target."""
        step = self._step(step)
        train = {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                 "rng": abstract_state.rng}
        out = self._read(step, ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_state.params)),
            train=ocp.args.StandardRestore(_abstract(train)), extra=ocp.args.JsonRestore()))
        t = out["train"]
        return TrainState(t["step"], out["params"], t["opt_state"], t["rng"]), out["extra"]

    def restore_params(self, abstract_params, step: int | None = None) -> tuple[dict, int]:
        """Only the parameters (no optimizer state is read): for inference and fine-tuning."""
        step = self._step(step)
        out = self._read(step, ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(abstract_params))))
        return out["params"], step

    def _read(self, step: int, args):
        _drop_reports_of_abandoned_reads()  # before: some arrive while orbax unwinds
        with warnings.catch_warnings():
            # When one read fails, orbax abandons the others: their coroutines are finalised
            # with "never awaited" warnings that add nothing to the error below.
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            try:
                return self._mgr.restore(step, args=args)
            except Exception as e:  # noqa: BLE001  orbax raises a bare Exception; sorted here
                problem = self._unreadable(step, e)
                if problem is None:
                    raise
            gc.collect()  # finalise them now, while their warning is filtered
        raise problem from None

    def _unreadable(self, step: int, e: Exception) -> GptjaxError | None:
        """The one-line error for a checkpoint that cannot be restored, or None when `e` is
        something else. orbax's exception is chained to tensorstore's, whose first line names
        the file; only the messages say what went wrong, so they are what is matched."""
        cause = e.__cause__ or e
        text = str(cause)
        first = (text.strip().splitlines() or [type(cause).__name__])[0][:300]
        where = f"checkpoint {step} in {self.directory}"
        if any(k in text for k in ("Error reading", "Error opening", "DATA_LOSS", "OUT_OF_RANGE")):
            others = [s for s in self.all_steps() if s != step]
            hint = f"; the others there: {', '.join(map(str, others))}" if others else ""
            return GptjaxError(f"{where} cannot be read ({first}){hint}")
        if "not compatible with the stored shape" in text or "tree structures do not match" in text:
            return GptjaxError(f"{where} does not match this model's parameters or optimizer "
                               f"state ({first})")
        return None

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _drop_reports_of_abandoned_reads() -> None:
    """Keep tensorstore's reads that orbax abandoned from printing a traceback each.

    When one read of a checkpoint fails, orbax raises its error and abandons the others,
    which then report around the one-line error in three ways:
    - they finish on tensorstore's threads after orbax's event loop has closed, and hand
      their results to it through `call_soon_threadsafe`, which raises "Event loop is
      closed" as an unraisable exception (no object; raised by asyncio's closed check);
    - their futures, never awaited, are logged by asyncio as "exception was never
      retrieved" with tensorstore's error;
    - orbax's per-shard read coroutines, closed unfinished when collected, raise from their
      error handler ("Exception ignored in: <coroutine _read_array_index_and_device_put>").
    Only those reports are dropped; any other goes where it went before. Installed once per
    process (the unraisable hook again if something replaced it since).
    """
    previous = sys.unraisablehook
    if not getattr(previous, "_gptjax_drops_abandoned_reads", False):
        def hook(unraisable):
            if not _abandoned_read(unraisable):
                previous(unraisable)

        hook._gptjax_drops_abandoned_reads = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReadFilter())


def _abandoned_read(unraisable) -> bool:
    """Whether an unraisable report is one of an abandoned read's (see above)."""
    exc, tb, obj = unraisable.exc_value, unraisable.exc_traceback, unraisable.object
    if inspect.iscoroutine(obj):
        return obj.__qualname__ == "_read_array_index_and_device_put"
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (type(exc) is RuntimeError and str(exc) == "Event loop is closed" and obj is None
            and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")


class _UnretrievedReadFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for a failed tensorstore read."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not ("exception was never retrieved" in str(record.msg)
                    and "tensorstore_spec" in str(exc))
