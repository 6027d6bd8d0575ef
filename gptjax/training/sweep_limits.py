"""The train settings a sweep cannot honour, with the reason each is refused. Free of JAX:
`gptjax sweep --help` reads it to leave those flags out."""

from __future__ import annotations

from gptjax import config as C
from gptjax.errors import GptjaxError

REFUSED = {
    "mesh": "spread members with --devices instead",
    "stats_every": "train the chosen member with gptjax train",
    "spike_policy": "a rollback would stop every member",
    "lr_tails": "tails extend a run's schedule: gptjax train --extend-to",
    "log_to": "a sweep writes metrics.jsonl only",
    "on_nonfinite": "a member with a non-finite loss is marked diverged and the others train "
                    "on; skipping its updates would hide that",
}


def check(t: C.TrainConfig) -> None:
    """Raise, in one line, for the first refused setting that `t` changes from what a sweep does."""
    given = {"mesh": t.mesh, "stats_every": t.stats_every, "spike_policy": t.spike_policy != "none",
             "lr_tails": t.lr_tails, "log_to": t.log_to not in ("", "jsonl"),
             "on_nonfinite": t.on_nonfinite != "abort"}
    for name, hint in REFUSED.items():
        if given[name]:
            raise GptjaxError(f"gptjax sweep does not take train.{name} ({hint})")
