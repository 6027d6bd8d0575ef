"""`gptjax check`: verify every checkpoint of a run against its checksums, as a table."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Read every checkpoint of a run (parameters and optimizer state, onto one device) and
compare each array, and the JSON beside them, with the SHA-256 checksums written in the
same commit. Prints one row per checkpoint; exits 1 when any is damaged, 0 otherwise.
Checkpoints written before gptjax recorded checksums are listed as "unverified".
Nothing is changed or deleted."""


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="verify a run's checkpoints against their checksums",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="run directory")


def run(args) -> int:
    from pathlib import Path

    from gptjax.errors import GptjaxError
    from gptjax.training.check_run import check_run
    from gptjax.training.run_dir import is_run

    if not is_run(Path(args.run)):
        raise GptjaxError(f"{args.run} is not a gptjax run (no config.json)")
    rows = check_run(Path(args.run) / "checkpoints")
    if not rows:
        raise GptjaxError(f"{args.run} has no checkpoints")
    width = max(len(str(r.step)) for r in rows)
    print(f"{'step':>{max(width, 4)}}  {'MB':>8}  {'status':<10}  detail")
    for r in rows:
        print(f"{r.step:>{max(width, 4)}}  {r.megabytes:>8.2f}  {r.status:<10}  {r.detail}")
    damaged = [r for r in rows if r.status == "damaged"]
    print(f"{len(rows) - len(damaged)} of {len(rows)} checkpoint(s) verify"
          + (f"; damaged: {', '.join(str(r.step) for r in damaged)}" if damaged else ""))
    return 1 if damaged else 0
