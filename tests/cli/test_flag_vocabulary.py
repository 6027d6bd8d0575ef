"""One flag vocabulary: every subcommand's options checked against one table of names and
metavars, and the old spellings hidden but still working, with a deprecation warning."""

import argparse
import dataclasses
import json

import pytest
from conftest import run_cli

from gptjax import config as C
from gptjax.cli.app import _parser
from gptjax.cli.config_file import _subparsers
from gptjax.cli.finetune import TUNING_METAVARS
from gptjax.cli.options import CHECKPOINT_HELP, METAVARS, RENAMED_FLAGS
from gptjax.finetune.settings import Tuning

# What each value-taking flag (or positional) is called in every command's --help.
TABLE = {
    "--out": "DIR", "--run": "RUN_DIR", "--base": "RUN_DIR", "--hf": "DIR_OR_NAME", "run": "RUN_DIR",
    "--checkpoint": "latest|best|STEP", "--base-checkpoint": "latest|best|STEP",
    "--gpt2-ranks": "FILE", "--config": "FILE", "--data": "DIR", "--records": "FILE",
    "--responses": "FILE", "--json": "FILE", "--results": "FILE",
    "--max-new-tokens": "INT", "--batch-size": "INT", "--context-length": "INT",
    "--vocab-size": "INT", "--seed": "INT", "--top-k": "INT", "--batches": "INT",
    "--workers": "INT", "--num-processes": "INT", "--process-id": "INT", "--repeats": "INT",
    "--steps": "INT", "--warmup": "INT", "--max-length": "INT", "--decode-prompt-tokens": "INT",
    "--decode-new-tokens": "INT", "--decode-batch-size": "LIST",
    "--temperature": "FLOAT", "--top-p": "FLOAT", "--val-fraction": "FLOAT", "--peak-flops": "FLOAT",
    "--prompt": "TEXT", "--stop": "TEXT", "texts": "TEXT", "inputs": "INPUT", "source": "SRC",
    "--stop-at": "STEP", "--extend-to": "STEPS", "--join-timeout": "SECONDS",
    "--coordinator": "HOST:PORT", "--text-field": "NAME", "--judge-model": "NAME",
    "--judge-url": "URL", "--api-key-env": "VAR", "--text-column": "COLUMN",
    "--label-column": "COLUMN", "--split": "FRACTIONS", "--preset": None, "--beta": "FLOAT",
    "--label-smoothing": "FLOAT", "--focal-gamma": "FLOAT", "--folds": "INT", "--loss": None,
    "--teacher": "RUN_DIR", "--teacher-checkpoint": "latest|best|STEP", "--student": "PRESET|RUN_DIR",
    "--student-checkpoint": "latest|best|STEP", "--alpha": "FLOAT", "--layers": "LIST",
    "--heads": "LIST", "--length": "INT", "--coords": "INT", "--directions": "INT",
    "--eps": "FLOAT", "--tolerance": "FLOAT", "--lrs": "LIST", "--weight-decays": "LIST",
    "--seeds": "LIST", "--devices": "INT", "--remats": "LIST", "--tokens": "COUNT",
    "--max-batch": "INT", "--device-memory": "GIB", "--bandwidth": "FLOAT", "--mesh": "MESH",
    "--host": "HOST", "--port": "INT", "--model-name": "NAME", "--max-queue": "INT",
    "--max-body-bytes": "INT", "--max-model-len": "INT", "--quant-group": "INT", "--input": "FILE",
    "--output": "FILE",
}
# Where one command's value is another kind of thing under the same name.
EXCEPTIONS = {
    ("bench", "--preset"): "LIST", ("bench", "--batch-size"): "LIST",
    ("bench", "--context-length"): "LIST", ("respond", "--out"): "FILE", ("judge", "--out"): "FILE",
    ("finetune-cls", "--data"): "FILE", ("finetune-sft", "--data"): "FILE",
    ("finetune-dpo", "--data"): "FILE", ("distill", "--data"): "DIR|FILE",
}
FIELDS = {f"{section}.{f.name}": f for section, cls in C.SECTIONS.items()
          for f in dataclasses.fields(cls)}
TUNING = {f"tuning.{f.name}": f for f in dataclasses.fields(Tuning)}


def _commands(parser, prefix=""):
    """(name, parser) of every command, nested ones ("inspect attention") included."""
    for name, sub in _subparsers(parser).items():
        yield prefix + name, sub
        yield from _commands(sub, f"{prefix}{name} ")


def _options():
    for command, sub in _commands(_parser()):
        for action in sub._actions:
            if action.nargs not in (0, argparse.PARSER) and action.dest != "help":
                yield command, action


def _expected(command: str, action: argparse.Action):
    if action.dest in FIELDS:  # a config field: its type's metavar, or its own
        f = FIELDS[action.dest]
        if f.metadata.get("choices"):
            return None
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
        return f.metadata.get("metavar", METAVARS[kind])
    if action.dest in TUNING:
        f = TUNING[action.dest]
        return TUNING_METAVARS.get(f.name, METAVARS[type(f.default)])
    name = (action.option_strings or [action.dest])[0]
    assert name in TABLE or (command, name) in EXCEPTIONS, f"{command} {name} is not in the table"
    return EXCEPTIONS.get((command, name), TABLE.get(name))


def test_every_option_of_every_command_is_named_and_shown_as_the_table_says():
    seen = 0
    for command, action in _options():
        if action.help == argparse.SUPPRESS:
            continue
        name = (action.option_strings or [action.dest])[0]
        if action.choices is not None:  # shown as {a,b,c}
            assert action.metavar is None, (command, name)
            continue
        assert action.metavar == _expected(command, action), (command, name, action.metavar)
        assert name not in RENAMED_FLAGS, f"{command} shows the old spelling {name}"
        if name.endswith("checkpoint"):
            assert action.help.endswith(CHECKPOINT_HELP), (command, action.help)
        seen += 1
    assert seen > 150  # every command, config and tuning fields included


def test_old_spellings_are_hidden_aliases_of_the_new_flags():
    hidden = {}
    for command, action in _options():
        for opt in action.option_strings:
            if opt in RENAMED_FLAGS:
                assert action.help == argparse.SUPPRESS
                hidden.setdefault(opt, []).append(command)
    assert set(hidden) == set(RENAMED_FLAGS)
    parser = _parser()
    new = parser.parse_args(["bench", "--batch-size", "4", "--context-length", "32"])
    with pytest.warns(UserWarning, match="--batch is renamed --batch-size"):
        old = parser.parse_args(["bench", "--batch", "4", "--context", "32"])
    assert (old.batch_size, old.context_length) == (new.batch_size, new.context_length) == ("4", "32")


def test_the_old_sample_flag_and_config_field_still_work(tmp_path, char_data, capsys):
    """A run written with train.sample_tokens resumes; --sample-tokens sets the new field."""
    from conftest import TINY_RUN
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                           "--max-steps", "3", "--sample-tokens", "5")
    assert code == 0 and "--sample-tokens is renamed --max-new-tokens" in err, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["max_new_tokens"] == 5 and len((out / "sample.txt").read_text()) == 5
    cfg["train"]["sample_tokens"] = cfg["train"].pop("max_new_tokens")  # as older runs wrote it
    (out / "config.json").write_text(json.dumps(cfg))
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--no-progress")
    assert code == 0 and "nothing to train" in stdout, err
    assert json.loads((out / "config.json").read_text())["train"]["max_new_tokens"] == 5
