"""`--config FILE`: TOML, YAML or JSON settings under the flags, a run's own files as input."""

import json

import pytest
from conftest import fails_cleanly, run_cli

TOML = """
preset = "tiny"
[train]
max_steps = 4
warmup_steps = 2
eval_every = 2
log_every = 1
batch_size = 4
max_new_tokens = 0
lr = 0.003
[model]
dropout = 0.0
"""

YAML = """
preset: tiny
train: {max_steps: 4, warmup_steps: 2, eval_every: 2, log_every: 1, batch_size: 4,
        max_new_tokens: 0, lr: 3e-3}  # YAML 1.1 reads 3e-3 as a string: taken as the number
model: {dropout: 0.0}
"""


def _config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_train_from_toml_or_yaml_with_flags_on_top_and_a_run_repeated_from_its_config(
        tmp_path, char_data, capsys):
    (tmp_path / "run.toml").write_text(TOML)
    (tmp_path / "run.yaml").write_text(YAML)
    flags = ["--data", char_data, "--no-progress", "--log-every", "2"]  # a flag beats the file
    for name in ("run.toml", "run.yaml"):
        code, _, err = run_cli(capsys, "train", "--config", tmp_path / name, *flags,
                               "--out", tmp_path / name.replace(".", "-"))
        assert code == 0, err
    toml_run, yaml_run = tmp_path / "run-toml", tmp_path / "run-yaml"
    cfg = _config(toml_run)
    assert (cfg["train"]["lr"], cfg["train"]["max_steps"], cfg["train"]["log_every"]) == (0.003, 4, 2)
    assert cfg["model"]["n_layer"] == 2  # the tiny preset, named in the file
    measured = lambda c: {**c, "train": {**c["train"], "peak_flops": None, "peak_source": None}}  # noqa: E731
    assert measured(_config(yaml_run)) == measured(cfg)  # each run measures its own peak
    assert _losses(yaml_run) == _losses(toml_run)

    # A run's config.json is a valid --config: the same run, step for step.
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "train", "--config", toml_run / "config.json", "--out", again,
                           "--no-progress")
    assert code == 0, err
    assert measured(_config(again)) == measured(cfg) and _losses(again) == _losses(toml_run)
    # ... but not its peak, which belongs to the machine that measured it,
    assert _config(again)["train"]["peak_source"] != "flag"
    # and a typed --preset beats the file's [model] fields, as any flag does.
    code, _, err = run_cli(capsys, "train", "--config", toml_run / "config.json", "--preset", "baby",
                           "--max-steps", "3", "--out", tmp_path / "baby", "--no-progress")
    assert code == 0 and _config(tmp_path / "baby")["model"]["n_layer"] == 4, err
    # --extend-to with the run's own config.json: the file's max_steps does not conflict.
    code, _, err = run_cli(capsys, "train", "--config", toml_run / "config.json", "--out", toml_run,
                           "--extend-to", "6", "--no-progress")
    assert code == 0 and _config(toml_run)["train"]["max_steps"] == 6, err


@pytest.mark.parametrize("text,suffix,match", [
    ("[train]\nlearning_rate = 1\n", ".toml", "unknown setting 'train.learning_rate'"),
    ("[train]\nlr = \"fast\"\n", ".toml", "train.lr must be a number, got 'fast'"),
    ("[train]\nmax_steps = 2.5\n", ".toml", "train.max_steps must be an integer, got 2.5"),
    ("[model]\ndtype = \"int8\"\n", ".toml", "model.dtype must be one of float32, bfloat16, float16"),
    ("[model]\nbias = 1\n", ".toml", "model.bias must be true or false, got 1"),
    ("[train\n", ".toml", "not valid TOML"),
    ("- 1\n- 2\n", ".yaml", "expected a mapping of settings at the top level"),
    ("max_steps = 3\n", ".ini", "expected a .toml, .yaml, .yml or .json file"),
])
def test_a_bad_config_file_is_one_line_and_nothing_is_written(tmp_path, capsys, char_data, text,
                                                              suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    fails_cleanly(capsys, "train", "--config", path, "--data", char_data, "--out", tmp_path / "out",
                  match=match)
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    fails_cleanly(capsys, "train", "--config", tmp_path / "none.toml", "--out", tmp_path / "out",
                  match="none.toml: No such file or directory")


def test_a_typed_starting_point_replaces_the_files_with_its_checkpoint(tmp_path):
    from gptjax.cli import config_file
    from gptjax.cli.app import _parser
    path = tmp_path / "sft.toml"
    path.write_text('[base]\nrun = "runs/a"\ncheckpoint = 1000\n[data]\npath = "d.json"\n'
                    '[tuning]\nlr = "1e-3"\n')
    args = config_file.parse_args(_parser(), ["finetune-sft", "--config", str(path), "--out", "o"])
    assert (args.base, args.hf, args.base_checkpoint, args.data) == ("runs/a", None, "1000", "d.json")
    assert getattr(args, "tuning.lr") == 1e-3
    args = config_file.parse_args(_parser(), ["finetune-sft", "--config", str(path), "--hf", "gpt2",
                                              "--out", "o"])
    assert (args.base, args.hf, args.base_checkpoint) == (None, "gpt2", "latest")
