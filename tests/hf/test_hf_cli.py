"""`gptjax convert` both ways, and what the converted directories are good for."""

import json

import jax
import numpy as np
import pytest
from conftest import fails_cleanly, run_cli

from gptjax import config as C
from gptjax.cli import main
from gptjax.data.tokenizer import GPT2Tokenizer
from gptjax.hf.io import load_hf, save_hf
from gptjax.hf.layout import abstract_params
from gptjax.runs.load import load as load_run
from gptjax.training.checkpoint import Checkpoints

GPT2_TINY = C.ModelConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, d_model=32)


def random_params(cfg: C.ModelConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), abstract_params(cfg))


def same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gpt2_ranks):
    """A random GPT-2-vocabulary model in the Hugging Face layout, with tokenizer files."""
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    params = random_params(GPT2_TINY)
    save_hf(params, GPT2_TINY, path, tokenizer=GPT2Tokenizer(gpt2_ranks))
    return path, params


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory, hf_dir, gpt2_ranks):
    out = tmp_path_factory.mktemp("runs") / "imported"
    assert main(["convert", str(hf_dir[0]), "--out", str(out), "--gpt2-ranks", gpt2_ranks]) == 0
    return out


def test_import_writes_a_run_with_the_same_weights(imported_run, hf_dir):
    assert sorted(p.name for p in imported_run.iterdir()) == ["checkpoints", "config.json",
                                                             "tokenizer.json"]
    loaded = load_run(imported_run)
    assert loaded.step == 0 and loaded.config.data.tokenizer == "gpt2"
    assert loaded.config.model == GPT2_TINY
    assert same_tree(loaded.params, hf_dir[1])


def test_generate_runs_on_the_imported_run(imported_run, capsys):
    code, out, err = run_cli(capsys, "generate", "--run", imported_run, "--prompt", "Hello",
                             "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("Hello") and len(out.strip()) > len("Hello")


def test_generate_hf_reads_the_folder_directly_and_matches_the_imported_run(
        imported_run, hf_dir, capsys, gpt2_ranks):
    args = ["--prompt", "Hello", "--prompt", "The", "--max-new-tokens", "6", "--temperature", "0",
            "--ignore-eot", "--gpt2-ranks", gpt2_ranks]
    code, from_hf, err = run_cli(capsys, "generate", "--hf", hf_dir[0], *args)
    assert code == 0, err
    code, from_run, err = run_cli(capsys, "generate", "--run", imported_run, *args)
    assert code == 0, err
    assert from_hf == from_run and from_hf.startswith("--- 1 ---\nHello")
    code, _, err = run_cli(capsys, "generate", "--hf", hf_dir[0], "--run", imported_run)
    assert code == 2 and "not allowed with" in err
    fails_cleanly(capsys, "generate", "--hf", hf_dir[0], "--checkpoint", "best", *args,
                  match="--hf folders have none")


def test_training_an_imported_run_is_refused_without_touching_it(imported_run, capsys):
    before = {p: p.read_bytes() for p in imported_run.rglob("*") if p.is_file()}
    fails_cleanly(capsys, "train", "--out", imported_run, "--no-progress",
                  match="weights without optimizer state")
    assert {p: p.read_bytes() for p in imported_run.rglob("*") if p.is_file()} == before


def test_export_of_the_run_loads_in_transformers(imported_run, hf_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    code, out, err = run_cli(capsys, "convert", imported_run, "--out", tmp_path / "hf")
    assert code == 0, err
    assert "exported step 0" in out and f"{sum(x.size for x in jax.tree.leaves(hf_dir[1])):,}" in out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json"]
    assert same_tree(load_hf(tmp_path / "hf")[1], hf_dir[1])
    m, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf").encode("Hello world") == [15496, 995]


def test_export_of_a_char_run_writes_no_tokenizer(tmp_path, capsys):
    cfg = C.RunConfig(model=C.preset("tiny", vocab_size=30), data=C.DataConfig(tokenizer="char"))
    src = tmp_path / "char-run"
    src.mkdir()
    C.save(cfg, src / "config.json")
    (src / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "abcdefghijklmnopqrstuvwxyz .!"}))
    ckpts = Checkpoints(src / "checkpoints")
    ckpts.save_params(0, random_params(cfg.model), {})
    ckpts.close()
    code, out, err = run_cli(capsys, "convert", src, "--out", tmp_path / "hf")
    assert code == 0, err
    assert "char tokenizer has no transformers equivalent" in out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 29


def test_help_explains_both_directions(capsys):
    code, out, _ = run_cli(capsys, "convert", "--help")
    assert code == 0
    assert "export:" in out and "import:" in out and "gpt2-medium" in out


def test_missing_source_fails_cleanly(tmp_path, capsys):
    # A path is not a valid Hub name, so this fails before any network access.
    fails_cleanly(capsys, "convert", tmp_path / "missing", "--out", tmp_path / "out",
                  match="neither a directory nor a Hugging Face model name; pass a directory "
                        "holding config.json and model.safetensors")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(hf_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    fails_cleanly(capsys, "convert", hf_dir[0], "--out", tmp_path / "out", match="not empty")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fine_tuning_starts_from_hugging_face_weights(hf_dir, gpt2_ranks, tmp_path, capsys):
    data = tmp_path / "texts.csv"
    data.write_text("text,label\n" + "".join(f"{'free prize' if i % 2 else 'see you'} {i},"
                                             f"{'spam' if i % 2 else 'ham'}\n" for i in range(40)))
    code, out, err = run_cli(capsys, "finetune-cls", "--hf", hf_dir[0], "--gpt2-ranks", gpt2_ranks,
                             "--data", data, "--epochs", "1", "--batch-size", "8", "--train", "head",
                             "--no-progress", "--out", tmp_path / "cls")
    assert code == 0, err
    spec = json.loads((tmp_path / "cls" / "finetune.json").read_text())
    assert spec["base"] == {"kind": "hf", "source": str(hf_dir[0].absolute())}
    code, out, err = run_cli(capsys, "classify", "--run", tmp_path / "cls", "--gpt2-ranks", gpt2_ranks,
                             "free prize 7")
    assert code == 0 and out.split()[0] in ("ham", "spam"), err
