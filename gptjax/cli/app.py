"""The `gptjax` command: the parser made of every command group's subcommands, and the
exit codes.

Exit codes: 0 success, 1 a run that started and failed (a non-finite loss, a failed write;
one line on stderr, the checkpoints before it intact), 2 bad input (one line on stderr,
nothing written), 130 interrupted or stopped by SIGTERM (the step reached is saved).
"""

from __future__ import annotations

import argparse
import sys

from gptjax.cli import bench as cli_bench
from gptjax.cli import check as cli_check
from gptjax.cli import config_file
from gptjax.cli import convert as cli_convert
from gptjax.cli import distill as cli_distill
from gptjax.cli import evaluate as cli_evaluate
from gptjax.cli import finetune as cli_finetune
from gptjax.cli import generate as cli_generate
from gptjax.cli import inspection as cli_inspection
from gptjax.cli import plan as cli_plan
from gptjax.cli import serve as cli_serve
from gptjax.cli import sweep as cli_sweep
from gptjax.cli import train as cli_train
from gptjax.errors import GptjaxError, Preempted, RunFailed


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, with exit code 2."""

    def error(self, message):
        self.exit(2, f"gptjax: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptjax", description="Build, train and sample GPTs in JAX.")
    from gptjax.version import __version__
    p.add_argument("--version", action="version", version=f"gptjax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cli_train.add_parsers(sub)
    cli_generate.add_parser(sub)
    cli_evaluate.add_parser(sub)
    cli_convert.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_check.add_parser(sub)
    cli_finetune.add_parsers(sub)
    cli_distill.add_parser(sub)
    cli_inspection.add_parser(sub)
    cli_sweep.add_parser(sub)
    cli_plan.add_parser(sub)
    cli_serve.add_parser(sub)
    return p


# Commands that repeat one compiled step and check its temporaries against the RAM
# (host_memory.fit_to_step): they keep freed host memory (gptjax/cpu/host_memory.py).
STEP_COMMANDS = {"train", "bench"}

COMMANDS = {**cli_train.COMMANDS, "generate": cli_generate.run, "eval": cli_evaluate.run,
            "convert": cli_convert.run, "bench": cli_bench.run,
            "check": cli_check.run, **cli_finetune.COMMANDS,
            "distill": cli_distill.run, "inspect": cli_inspection.run, **cli_sweep.COMMANDS,
            **cli_plan.COMMANDS, **cli_serve.COMMANDS}


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings for a CLI user: one line, no pointer into library source."""
    print(f"gptjax: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.showwarning = _one_line_warning
    args = config_file.parse_args(_parser(), sys.argv[1:] if argv is None else list(argv))
    if args.command in STEP_COMMANDS:
        from gptjax.cpu.host_memory import keep_freed_memory
        keep_freed_memory()  # before anything starts JAX's runtime
    try:
        return COMMANDS[args.command](args)
    except RunFailed as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 1
    except GptjaxError as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable or impossible paths, full disks: say so in one line
        print(f"gptjax: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        saved = " (checkpoint saved; rerun the same command to resume)" if args.command == "train" else ""
        what = f"{e.reason} at step {e.step}" if isinstance(e, Preempted) else "interrupted"
        print(f"gptjax: {what}{saved}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
