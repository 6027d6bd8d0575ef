"""`gptjax sweep`: N copies of one model (learning rates x weight decays x seeds) trained
together by one vmapped, compiled step, reported as a table and a loss plot."""

from __future__ import annotations

import time
from pathlib import Path

from gptjax import config as C
from gptjax.cli.options import add_config_flags, apply_overrides
from gptjax.cli.train import add_run_config_source
from gptjax.errors import GptjaxError
from gptjax.training.sweep_limits import REFUSED


def add_parser(sub) -> None:
    sw = sub.add_parser(
        "sweep", help="train N copies of a model (learning rates, weight decays, seeds) in "
        "one vmapped step", description="Train every combination of the --lrs, "
        "--weight-decays and --seeds values as one batch of models: their states are stacked "
        "and one compiled step (jax.vmap) trains them all, so small models share the device "
        "instead of each waiting for its own steps. Each member trains exactly as `gptjax "
        "train` with its values would (same initial weights, same batches). Writes "
        "metrics.jsonl (records carry a member index), sweep.md (the table), sweep.json and "
        "loss.png; keeps no checkpoints. A member whose loss turns non-finite is marked "
        "diverged and the others train on.")
    sw.add_argument("--out", metavar="DIR", help="new folder for the sweep (default: "
                    "sweeps/<date-time>)")
    add_run_config_source(sw)
    grid = sw.add_argument_group("the members", "every combination of these values is one "
                                 "member; an axis not given keeps the train config's value")
    grid.add_argument("--lrs", metavar="LIST", default="", help="peak learning rates, e.g. "
                      "1e-3,3e-4 (min_lr and the schedule's shape are shared)")
    grid.add_argument("--weight-decays", metavar="LIST", default="", help="AdamW weight decays")
    grid.add_argument("--seeds", metavar="LIST", default="", help="seeds (initial weights, "
                      "dropout and batch sampling)")
    sw.add_argument("--devices", type=int, default=1, metavar="INT", help="spread the members "
                    "over this many devices (it must divide their number; default: 1)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(sw, hidden=REFUSED)


def run(args) -> int:
    from gptjax.cli.train import preset_overrides
    from gptjax.training import sweep
    from gptjax.training.sweep_run import run_sweep

    cfg = apply_overrides(C.RunConfig(model=C.preset(args.preset or C.DEFAULT_PRESET)),
                          preset_overrides(args))
    members = sweep.grid(cfg, lrs=_values(args.lrs, float, "--lrs"),
                         weight_decays=_values(args.weight_decays, float, "--weight-decays"),
                         seeds=_values(args.seeds, int, "--seeds"))
    out = Path(args.out or f"sweeps/{time.strftime('%Y%m%d-%H%M%S')}")
    run_sweep(cfg, members, out, devices=args.devices, progress=not args.no_progress)
    return 0


def _values(text: str, kind, flag: str) -> list:
    if not text.strip():
        return []
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        name = "integers" if kind is int else "numbers"
        raise GptjaxError(f"{flag} takes comma-separated {name}, got {text!r}") from None


COMMANDS = {"sweep": run}
