"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow.

    log = tracked(JsonlLog(out / "metrics.jsonl"), parse_log_to("jsonl,tensorboard"), out, ...)

metrics.jsonl stays the run's record (resume trims it; the plots read it). A tracker gets
each record's numbers as scalars tagged KIND/FIELD ("train/loss", "eval/val_loss") at the
record's step. Trackers are fed by one background thread, so a slow disk or a slow
tracker never holds up a training step; a tracker that fails is dropped with one warning,
and training goes on. Each is an optional extra (`pip install 'gptjax[tensorboard]'`).
Files go under the run folder: OUT/tensorboard/, OUT/wandb/ (offline unless WANDB_MODE
says otherwise) and OUT/mlruns/ (a local MLflow file store). A resumed run continues the
same W&B and MLflow run; TensorBoard appends a new event file to the same folder.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import warnings
from pathlib import Path

from gptjax.errors import GptjaxError

SINKS = ("jsonl", "tensorboard", "wandb", "mlflow")
_EXTRA = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb"),
          "mlflow": ("mlflow", "mlflow")}


def parse_log_to(text: str) -> tuple[str, ...]:
    """'jsonl,tensorboard' -> ("tensorboard",): the trackers besides metrics.jsonl, which
    every run writes. Unknown names and trackers whose package is missing are refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SINKS]
    if unknown or not names:
        raise GptjaxError(f"--log-to must be a comma-separated list of {', '.join(SINKS)}, got {text!r}")
    chosen = tuple(dict.fromkeys(n for n in names if n != "jsonl"))
    import importlib.util
    for name in chosen:
        module, extra = _EXTRA[name]
        if importlib.util.find_spec(module) is None:
            raise GptjaxError(f"--log-to {name} needs the {module} package: pip install 'gptjax[{extra}]'")
    return chosen


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {"KIND/FIELD": value}) of a metrics record's finite numbers."""
    kind = record.get("kind", "train")
    values = {f"{kind}/{k}": float(v) for k, v in record.items()
              if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}
    return int(record.get("step", 0)), values


class TensorBoardSink:
    def __init__(self, out: Path, name: str, params: dict):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(params.items())))

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out: Path, name: str, params: dict):
        import os
        import uuid

        import wandb
        id_file = out / "wandb" / "run-id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gptjax"), name=name, id=run_id,
                              resume="allow", dir=str(out), config=params,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              # quiet, and not capturing the console: gptjax prints its own lines
                              settings=wandb.Settings(silent=True, console="off"))
        id_file.write_text(run_id + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    EXPERIMENT = "gptjax"

    def __init__(self, out: Path, name: str, params: dict):
        import os
        # A folder of plain files needs no server or database; MLflow 3 keeps this store in
        # maintenance mode and asks for the opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        store = (out / "mlruns").absolute()
        self.client = MlflowClient(tracking_uri=store.as_uri())
        id_file = store / "run-id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(self.EXPERIMENT))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in sorted(params.items())])
        id_file.write_text(self.run_id + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_CLASSES = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink}


class Tracked:
    """A metrics log (JsonlLog's interface) that also feeds trackers, off the caller's thread."""

    def __init__(self, log, sinks: tuple[str, ...], out: Path, name: str, params: dict):
        self.log, self.path = log, log.path
        self._queue: queue.Queue = queue.Queue()
        self._opening = [(n, lambda n=n: _CLASSES[n](Path(out), name, params)) for n in sinks]
        self._thread = threading.Thread(target=self._drain, name="gptjax-trackers", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        self.log.write(record)
        self._queue.put(dict(record))

    def truncate_after(self, step: int) -> None:
        self.log.truncate_after(step)

    def read(self) -> list[dict]:
        return self.log.read()

    def close(self) -> None:
        """Send what is queued and close the trackers (waits for them)."""
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        sinks = {}
        for name, open_sink in self._opening:  # opened here: an import or a login never stalls the caller
            try:
                sinks[name] = open_sink()
            except Exception as e:  # noqa: BLE001  any tracker failure: warn, train on
                warnings.warn(f"--log-to {name} is off for this run: {type(e).__name__}: {e}")
        while (record := self._queue.get()) is not None:
            step, values = scalars(record)
            for name, sink in list(sinks.items()):
                try:
                    if values:
                        sink.log(step, values)
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"--log-to {name} stopped at step {step}: {type(e).__name__}: {e}")
                    del sinks[name]
        for name, sink in sinks.items():
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"--log-to {name} did not close cleanly: {type(e).__name__}: {e}")


def tracked(log, sinks: tuple[str, ...], out: Path, name: str, params: dict):
    """`log` itself when there are no trackers, else a Tracked around it (close() it)."""
    return Tracked(log, sinks, out, name, params) if sinks else log
