"""`--config FILE`: a command's settings from a TOML, YAML or JSON file; flags override it.

For `gptjax train` the file has the sections of a run's config.json (`[model]`, `[train]`,
`[data]`, any subset of their fields), so a run's own config.json repeats it elsewhere.
The fine-tuning commands take `[base]` (`run` and `checkpoint`, or `hf`), `[data]` (the
data file as `path`, and the task's data options) and `[tuning]`, which is also the layout
of a fine-tuned run's finetune.json (accepted as it is). Other top-level keys name a
command's flags (`preset = "mini"`).

The file's values become the defaults of the flags they name, checked against each flag's
type and choices as if typed; the command line then parses as usual, so an explicit flag
wins. A value of null leaves the flag's own default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptjax import config as C
from gptjax.errors import GptjaxError

FINETUNE_TASKS = {"finetune-cls": "cls", "finetune-sft": "sft", "finetune-lm": "lm",
                  "finetune-dpo": "dpo"}


# A run flag and the flag naming its checkpoint (gptjax distill has two runs).
_CHECKPOINT_OF = {"base": "base_checkpoint", "hf": "base_checkpoint", "teacher": "teacher_checkpoint",
                  "student": "student_checkpoint"}


def add_config_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", metavar="FILE", help=f"settings from a TOML, YAML or JSON "
                        f"file ({what}); flags given as well override it")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parser.parse_args(argv), with the subcommand's flags defaulting to its --config file."""
    path = _config_path(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = _subparsers(parser).get(command) if path is not None else None
    if sub is None or not any(a.dest == "config" for a in sub._actions):
        return parser.parse_args(argv)  # argparse names a --config the command does not take
    try:
        values = _flatten(read(Path(path)), command)
        actions = {}
        for a in sub._actions:  # the flag itself, not a hidden old spelling of it
            actions.setdefault(a.dest, a)
        from_file = {dest: _checked(actions, dest, value, path)
                     for dest, value in values.items() if value is not None}
    except GptjaxError as e:
        parser.exit(2, f"gptjax: error: {e}\n")
    own_defaults = {dest: actions[dest].default for dest in from_file}
    for dest, value in from_file.items():
        actions[dest].default, actions[dest].required = value, False
    for group in sub._mutually_exclusive_groups:
        if any(a.dest in from_file for a in group._group_actions):
            group.required = False
    args = parser.parse_args(argv)
    for group in sub._mutually_exclusive_groups:  # a flag replaces the file's choice
        typed = [a for a in group._group_actions if _typed(a, argv)]
        for a in group._group_actions:
            if typed and a not in typed and a.dest in from_file:
                setattr(args, a.dest, None)
    # ... and a typed run takes its own checkpoint, not the one the file named for another
    for run, checkpoint in _CHECKPOINT_OF.items():
        if (run in actions and _typed(actions[run], argv) and checkpoint in from_file
                and not _typed(actions[checkpoint], argv)):
            setattr(args, checkpoint, own_defaults[checkpoint])
    # What came from the file rather than the command line: a typed flag outranks it
    # (gptjax train's --preset against the file's [model] fields, --extend-to against its
    # max_steps).
    args.from_config = {dest for dest in from_file if not _typed(actions[dest], argv)}
    return args


def read(path: Path) -> dict:
    """The file as a mapping, or one line naming what is wrong with it."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise GptjaxError(f"--config {path}: expected a .toml, .yaml, .yml or .json file")
    except OSError as e:
        raise GptjaxError(f"--config {path}: {e.strerror}") from None
    except GptjaxError:
        raise
    except Exception as e:  # noqa: BLE001  each parser has its own error class
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptjaxError(f"--config {path}: not valid {suffix[1:].upper()} ({first})") from None
    if not isinstance(raw, dict):
        raise GptjaxError(f"--config {path}: expected a mapping of settings at the top level")
    return raw


def _config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _flatten(raw: dict, command: str) -> dict:
    """{flag dest: value} from the file's layout for `command`."""
    if command == "distill" and "task" in raw and "settings" in raw:
        return _distill_run(raw)
    if command not in FINETUNE_TASKS:
        out = {}
        for key, value in raw.items():
            if isinstance(value, dict):  # a config section; old field names still read
                renamed = C.RENAMED.get(key, {})
                out.update({f"{key}.{renamed.get(k, k)}": v for k, v in value.items()})
            else:
                out[key] = value
        if "peak_source" in raw.get("train", {}):
            # A run's own config: its peak belongs to the machine that measured it.
            out.pop("train.peak_flops", None)
            out.pop("train.peak_source", None)
        return out
    if "task" in raw and "settings" in raw:  # a fine-tuned run's finetune.json
        if raw["task"] != FINETUNE_TASKS[command]:
            made_by = {t: c for c, t in FINETUNE_TASKS.items()}.get(raw["task"], raw["task"])
            raise GptjaxError(f"--config holds the settings of a {made_by} run, not {command}")
        # A cross-validation fold's number describes that run, not a setting: its file
        # repeats the whole cross-validation (data.folds).
        raw = {"base": raw.get("base", {}), **{k: v for k, v in raw["settings"].items() if k != "fold"}}
    out = {}
    for key, value in raw.items():
        if key == "base":
            out.update(_base(value))
        elif key == "tuning" and isinstance(value, dict):
            out.update({f"tuning.{k}": v for k, v in value.items()})
        elif key == "data" and isinstance(value, dict):
            for k, v in value.items():
                out["data" if k == "path" else k] = ",".join(map(str, v)) if k == "split" else v
        else:
            out[key] = value
    return out


# What distill derives from the teacher, or does not take: left out of a rerun's flags.
_DISTILL_DERIVED = {"pooling", "max_length", "balance", "loss", "focal_gamma", "folds"}


def _distill_run(raw: dict) -> dict:
    """A distilled run's finetune.json as gptjax distill's flags: its student (the base),
    teacher, loss, data and tuning."""
    if raw["task"] != "distill":
        raise GptjaxError(f"--config holds the settings of a finetune-{raw['task']} run, not distill")
    settings, base = raw["settings"], raw.get("base", {})
    out = {f"tuning.{k}": v for k, v in settings.get("tuning", {}).items()}
    if base.get("kind") == "preset":
        out["student"] = base.get("preset")
    else:
        out["student"], out["student_checkpoint"] = base.get("path"), str(base.get("checkpoint"))
    kd = settings.get("distill", {})
    teacher = kd.get("teacher", {})
    out.update(alpha=kd.get("alpha"), temperature=kd.get("temperature"), teacher=teacher.get("path"),
               teacher_checkpoint=str(teacher.get("checkpoint")))
    data = settings.get("data")
    if isinstance(data, dict):  # a classifier's labelled texts
        for k, v in data.items():
            if k not in _DISTILL_DERIVED:
                out["data" if k == "path" else k] = ",".join(map(str, v)) if k == "split" else v
    else:
        out["data"] = data
    return out


def _base(value) -> dict:
    """[base] as run/checkpoint or hf; finetune.json's {"kind", "path"/"source", "checkpoint"}."""
    if not isinstance(value, dict):
        raise GptjaxError("--config: base must be a table with run (and checkpoint) or hf")
    kind = value.get("kind")
    run = value.get("run", value.get("path") if kind == "run" else None)
    hf = value.get("hf", value.get("source") if kind == "hf" else None)
    out = {"base": run, "hf": hf}
    if value.get("checkpoint") is not None:
        out["base_checkpoint"] = str(value["checkpoint"])
    unknown = set(value) - {"kind", "run", "path", "hf", "source", "checkpoint"}
    if unknown:
        raise GptjaxError(f"--config: unknown base setting(s): {', '.join(sorted(unknown))}")
    return out


def _checked(actions: dict, dest: str, value, path: str):
    """The file's value for a flag, as typed on the command line would give it."""
    if dest not in actions or dest in ("help", "config", "command"):
        raise GptjaxError(f"--config {path}: unknown setting {dest!r}")
    action, name = actions[dest], dest
    if action.nargs == 0:  # switches: store_true and --x/--no-x
        if not isinstance(value, bool):
            raise GptjaxError(f"--config {path}: {name} must be true or false, got {value!r}")
        return value
    kind = action.type or str
    if kind in (int, float) and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            value = kind(value)
        except ValueError:
            pass
    ok = (isinstance(value, str) if kind is str
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else True)
    if not ok:
        wanted = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise GptjaxError(f"--config {path}: {name} must be {wanted}, got {value!r}")
    value = kind(value) if kind in (int, float) else value
    if action.choices is not None and value not in action.choices:
        raise GptjaxError(f"--config {path}: {name} must be one of "
                          f"{', '.join(map(str, action.choices))}, got {value!r}")
    return value


def _typed(action: argparse.Action, argv: list[str]) -> bool:
    return any(a == opt or a.startswith(opt + "=") for opt in action.option_strings for a in argv)
