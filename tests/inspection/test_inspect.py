"""`gptjax inspect`: gradcheck passes on the model and catches a gradient 0.1% wrong;
attention maps are written per layer with the weights of the model, selections and bad
input are handled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN, fails_cleanly, run_cli

from gptjax import model
from gptjax.config import preset
from gptjax.errors import GptjaxError
from gptjax.inspection.gradcheck import check, check_model

CFG = preset("tiny", vocab_size=40)


def test_the_models_gradients_pass():
    report = check_model(CFG, coords=3, directions=2)
    assert len(report.leaves) == len(jax.tree.leaves(jax.eval_shape(
        lambda: model.init(CFG, jax.random.PRNGKey(0)))))
    assert report.worst < 1e-5, report


def test_a_gradient_off_by_a_tenth_of_a_percent_is_caught_in_its_leaf():
    with jax.enable_x64(True):
        cfg = preset("tiny", vocab_size=40, dtype="float64", param_dtype="float64")
        params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(cfg, jax.random.PRNGKey(0)))
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 40)
        data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

        def loss(p):
            return model.loss(p, data, cfg)

        def wrong_grad(p):
            g = jax.grad(loss)(p)
            g["ln_f"]["scale"] = g["ln_f"]["scale"] * 1.001
            return g

        report = check(loss, params, grad=wrong_grad, coords=4, directions=0)
    worst = {leaf.name: leaf.worst for leaf in report.leaves}
    assert 5e-4 < worst.pop("ln_f/scale") < 2e-3
    assert max(worst.values()) < 1e-5


def test_gradcheck_refuses_float32():
    params = model.init(CFG, jax.random.PRNGKey(0))
    with pytest.raises(GptjaxError, match="float64"):
        check(lambda p: jnp.sum(p["ln_f"]["scale"]), params)


def test_the_cli_reports_every_parameter_and_fails_above_the_tolerance(capsys):
    # (the passing side is test_the_models_gradients_pass: one float64 compile less here)
    code, out, err = run_cli(capsys, "inspect", "gradcheck", "--coords", "1", "--directions", "1",
                             "--tolerance", "1e-15")
    assert code == 1 and "FAILS" in out and "exceeds --tolerance" in err
    assert "blocks/attn/qkv/kernel" in out and "ln_f/scale" in out and "1 random directions" in out
    fails_cleanly(capsys, "inspect", "gradcheck", "--length", "99", match="context_length")
    fails_cleanly(capsys, "inspect", "gradcheck", "--coords", "0", "--directions", "0",
                  match="nothing would be checked")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("inspect") / "run"
    from gptjax.cli.app import main
    assert main(["train", "--data", str(char_data), "--out", str(out), *TINY_RUN,
                 "--max-steps", "3", "--max-new-tokens", "0"]) == 0
    return out


def test_attention_maps_are_the_models_weights_per_layer(tiny_run, tmp_path, capsys):
    from gptjax.runs.load import load_run
    prompt = "The cat sat"
    code, out, err = run_cli(capsys, "inspect", "attention", "--run", tiny_run, "--prompt", prompt,
                             "--out", tmp_path / "maps", "--heads", "1")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert pngs == ["attention_layer0.png", "attention_layer1.png"]
    saved = np.load(tmp_path / "maps" / "attention.npz")
    run = load_run(tiny_run)
    ids = run.tokenizer.encode(prompt)
    _, seen = model.apply_observed(run.params, jnp.asarray([ids]), run.config.model)
    np.testing.assert_array_equal(saved["probs"], seen["attn_probs"])
    assert list(saved["tokens"]) == [c.replace(" ", "\u00b7") for c in prompt]
    code, _, err = run_cli(capsys, "inspect", "attention", "--run", tiny_run, "--prompt", prompt,
                           "--out", tmp_path / "last", "--layers", "-1")
    assert code == 0 and [p.name for p in (tmp_path / "last").glob("*.png")] == ["attention_layer1.png"]


@pytest.mark.parametrize("flags, match", [
    (["--layers", "2"], "--layers: 2 is out of range"),
    (["--heads", "one"], "--heads takes all or comma-separated"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x" * 33], "at most 32"),
])
def test_bad_selections_and_prompts_are_one_line_and_write_nothing(tiny_run, tmp_path, capsys,
                                                                  flags, match):
    argv = ["inspect", "attention", "--run", tiny_run, "--prompt", "abc", "--out", tmp_path / "maps"]
    fails_cleanly(capsys, *argv, *flags, match=match)
    assert not (tmp_path / "maps").exists()
