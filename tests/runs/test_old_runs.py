"""A run made by gptjax before its package layout (tests/fixtures/pre_layout, made at
commit 7b08fd5) still resumes, generates, evaluates and exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_cli

from gptjax.hf.io import load_hf
from gptjax.runs.load import load as load_run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pre_layout"


@pytest.fixture
def old_run(tmp_path) -> Path:
    """A copy of the old run whose config names the copy of its data: the folder it
    recorded (/tmp/fx/data) was on the machine that made it."""
    shutil.copytree(FIXTURE / "data", tmp_path / "data")
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["data"] == "/tmp/fx/data"  # the fixture is what its README says
    cfg["data"]["data"] = str(tmp_path / "data")
    (run / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return run


def test_the_old_run_resumes_to_its_last_step(capsys, old_run):
    before = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    code, out, err = run_cli(capsys, "train", "--out", old_run, "--no-progress")
    assert code == 0, err
    assert f"resuming {old_run} from step 3" in out
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["3", "6"]
    after = [json.loads(line) for line in (old_run / "metrics.jsonl").read_text().splitlines()]
    assert after[:len(before)] == before  # the old records are kept, the new ones follow
    assert [r["step"] for r in after if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert load_run(old_run).step == 6


def test_the_old_run_generates_evaluates_and_exports(capsys, old_run, tmp_path):
    code, out, err = run_cli(capsys, "generate", "--run", old_run, "--max-new-tokens", "6",
                             "--temperature", "0", "--prompt", "The ")
    assert code == 0, err
    assert out.startswith("The ") and len(out.rstrip("\n")) > len("The ")

    code, out, err = run_cli(capsys, "eval", "--run", old_run)
    assert code == 0, err
    assert out.startswith("step 3: val loss ")

    code, out, err = run_cli(capsys, "convert", old_run, "--out", tmp_path / "hf")
    assert code == 0, err
    _, exported = load_hf(tmp_path / "hf")
    restored = load_run(old_run).params
    for (k1, a), (k2, b) in zip(_leaves(exported), _leaves(restored), strict=True):
        assert k1 == k2 and np.array_equal(a, b), k1


def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]
