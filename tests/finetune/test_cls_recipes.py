"""Classification recipes past the book: three classes (the guide's sentiment example),
focal loss, gradual unfreezing with layer-wise learning rates, and stratified K-fold
cross-validation, on a synthetic set whose first word decides the class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import byte_base, fails_cleanly, run_cli

from gptjax.cli import config_file
from gptjax.cli.app import _parser
from gptjax.finetune.cls_folds import split_rest, stratified_folds
from gptjax.runs.load import load_base, load_finetuned

WORDS = "apple river stone cloud paper glass music table light green".split()
OPENERS = {"positive": "great fun", "negative": "awful day", "neutral": "plain note"}
CLS = ["--batch-size", "8", "--no-progress", "--lr", "3e-3", "--base-lr", "3e-3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    return byte_base(tmp_path_factory.mktemp("recipes"), corpus_file)


@pytest.fixture(scope="module")
def sentiment(base):
    """90 JSONL records, 30 per class; the class is in the opening words."""
    rng = np.random.default_rng(1)
    rows = [{"text": f"{OPENERS[label]} {' '.join(rng.choice(WORDS, 3))}", "label": label}
            for i in range(90) for label in [("positive", "negative", "neutral")[i % 3]]]
    path = base / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_sentiment_classes_with_focal_loss(base, sentiment, tmp_path, capsys):
    out = tmp_path / "cls"
    code, said, _ = run_cli(capsys, "finetune-cls", "--base", base / "base", "--data", sentiment, *CLS,
                            "--epochs", "6", "--loss", "focal", "--focal-gamma", "2", "--out", out)
    assert code == 0
    report = json.loads((out / "test_report.json").read_text())
    assert set(report["per_class"]) == {"negative", "neutral", "positive"}
    assert np.asarray(report["confusion"]).shape == (3, 3) and report["n"] == 18  # 20% of 90
    assert report["accuracy"] >= 0.9, report
    settings = json.loads((out / "finetune.json").read_text())["settings"]["data"]
    assert settings["loss"] == "focal" and settings["focal_gamma"] == 2.0
    code, said, _ = run_cli(capsys, "classify", "--run", out, "--json", "awful day stone cloud paper",
                            "great fun glass music table")
    assert code == 0
    got = [json.loads(line) for line in said.splitlines()]
    assert [g["label"] for g in got] == ["negative", "positive"]
    assert all(len(g["probabilities"]) == 3 for g in got)


def test_gradual_unfreezing_keeps_the_unopened_layers_bitwise(base, sentiment, tmp_path, capsys):
    out = tmp_path / "gradual"
    # 63 training texts / 8 = 7 steps an epoch: stage 0 (head, final norm) for 7 steps, then
    # the top block; the bottom block and the embeddings never open in 14 steps.
    code, said, _ = run_cli(capsys, "finetune-cls", "--base", base / "base", "--data", sentiment, *CLS,
                            "--epochs", "2", "--unfreeze", "gradual:1", "--layer-lr-decay", "0.5",
                            "--patience", "0", "--out", out)
    assert code == 0
    assert "gradual unfreezing: one more layer every 7 steps, the head and final norm first" in said
    assert "reaches stage 1 of 3 (the top 1 block(s) open)" in said
    assert "block 1 x0.5, embeddings x0.25" in said
    before = load_base(str(base / "base"), None, "latest", None).params
    after = load_finetuned(out, "latest", None).params["gpt"]
    for name in ("wte", "wpe"):
        old, new = before[name]["embedding"], after[name]["embedding"]
        assert np.asarray(old).tobytes() == np.asarray(new).tobytes()
    old, new = before["blocks"]["mlp"]["fc"]["kernel"], after["blocks"]["mlp"]["fc"]["kernel"]
    assert np.asarray(old[0]).tobytes() == np.asarray(new[0]).tobytes()  # block 1: never opened
    assert np.abs(np.asarray(old[1]) - np.asarray(new[1])).max() > 0  # block 2: opened at step 7


def test_stratified_k_fold_reports_every_fold_and_the_spread(base, sentiment, tmp_path, capsys):
    out = tmp_path / "folds"
    code, said, _ = run_cli(capsys, "finetune-cls", "--base", base / "base", "--data", sentiment, *CLS,
                            "--epochs", "2", "--folds", "3", "--out", out)
    assert code == 0
    result = json.loads((out / "folds.json").read_text())
    assert result["k"] == 3 and len(result["folds"]) == 3
    for fold in result["folds"]:  # 30 test texts each, 10 per class: stratified
        assert fold["n"] == 30 and [c["support"] for c in fold["per_class"].values()] == [10, 10, 10]
    assert sorted(sum(result["test_rows"], [])) == list(range(90))  # each record tested once
    records = sentiment.read_text().splitlines()
    for fold, rows in zip(result["folds"], result["test_rows"]):
        labels = [json.loads(records[r])["label"] for r in rows]
        assert {c: labels.count(c) for c in set(labels)} == {c: 10 for c in fold["per_class"]}
    acc = [f["accuracy"] for f in result["folds"]]
    assert result["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert result["summary"]["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert set(result["summary"]) >= {"macro_f1", "loss", "neutral/f1", "positive/recall"}
    summary = said.split("3-fold cross-validation", 1)[1]
    assert "mean ± std" in summary and all(f"fold {i} confusion matrix" in summary for i in (1, 2, 3))
    for i in (1, 2, 3):
        assert (out / f"fold-{i}" / "test_report.json").is_file()
        assert json.loads((out / f"fold-{i}" / "finetune.json").read_text())["settings"]["fold"] == i
    # A fold's finetune.json repeats the whole cross-validation as --config.
    fold_file = str(out / "fold-2" / "finetune.json")
    argv = ["finetune-cls", "--config", fold_file, "--out", str(tmp_path / "again")]
    args = config_file.parse_args(_parser(), argv)
    assert args.folds == 3 and args.data == str(sentiment.absolute())


@pytest.mark.parametrize("seed", range(20))
def test_folds_partition_the_rows_and_validation_never_sees_the_test_fold(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, int(rng.integers(30, 200)))
    labels[:15] = np.repeat([0, 1, 2], 5)  # every class at least 5 times
    folds = stratified_folds(labels, 5, seed)
    rows = np.concatenate(folds)
    assert sorted(rows.tolist()) == list(range(len(labels)))  # disjoint and complete
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for c in range(3):  # stratified: each class within one of an even share per fold
        per_fold = [int((labels[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    for i, test in enumerate(folds):
        rest = np.concatenate([f for j, f in enumerate(folds) if j != i])
        train, val = split_rest(rest, labels, 0.125, seed)
        assert sorted(np.concatenate([train, val]).tolist()) == sorted(rest.tolist())
        assert not set(test.tolist()) & (set(train.tolist()) | set(val.tolist()))
        assert set(labels[val].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("extra, match", [
    (["--folds", "1"], "--folds must be at least 2 (or 0 for one split), got 1"),
    (["--folds", "31"], "--folds 31 needs at least 31 texts of every class, but class 'negative' has 30"),
    (["--folds", "3", "--batch-size", "64"], "fold 1's training part has"),
    (["--layer-lr-decay", "0"], "--layer-lr-decay must be in (0, 1], got 0.0"),
    (["--layer-lr-decay", "1.5"], "--layer-lr-decay must be in (0, 1], got 1.5"),
    (["--focal-gamma", "-1"], "--focal-gamma must be >= 0"),
    (["--unfreeze", "gradual"], "--unfreeze must be gradual:EPOCHS"),
    (["--loss", "hinge"], "invalid choice: 'hinge'"),
])
def test_bad_recipe_settings_are_one_line_and_write_nothing(base, sentiment, tmp_path, capsys, extra, match):
    fails_cleanly(capsys, "finetune-cls", "--base", base / "base", "--data", sentiment, *CLS, *extra,
                  "--out", tmp_path / "out", match=match)
    assert not (tmp_path / "out").exists()


def test_focal_loss_is_the_hand_formula_and_cross_entropy_at_gamma_zero():
    import jax.numpy as jnp
    import optax

    from gptjax.model.classifier import focal
    z = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = jnp.array([0, 2])
    p = np.exp(np.asarray(z)) / np.exp(np.asarray(z)).sum(1, keepdims=True)
    p_true = p[[0, 1], [0, 2]]
    np.testing.assert_allclose(focal(z, y, 2.0), -(1 - p_true) ** 2 * np.log(p_true), rtol=1e-6)
    np.testing.assert_allclose(focal(z, y, 0.0), optax.softmax_cross_entropy_with_integer_labels(z, y),
                               rtol=1e-6)
    # A saturated row (1 - p_t rounds to 0) keeps finite gradients at every gamma.
    import jax
    sure = jnp.array([[40.0, 0.0, 0.0]])
    for gamma in (0.0, 0.5, 2.0):
        g = jax.grad(lambda z, gamma=gamma: focal(z, jnp.array([0]), gamma).sum())(sure)
        assert np.all(np.isfinite(np.asarray(g))), gamma
    # The confident, correct row loses more of its weight than the unsure one.
    assert focal(z, y, 2.0)[0] / focal(z, y, 0.0)[0] < focal(z, y, 2.0)[1] / focal(z, y, 0.0)[1]


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-targets", "all"]], ids=["full", "lora"])
def test_a_classifier_exports_to_transformers_with_the_same_logits(base, sentiment, tmp_path, capsys, extra):
    torch = pytest.importorskip("torch")
    from transformers import GPT2ForSequenceClassification

    from gptjax.finetune import batching
    from gptjax.model.classifier import logits
    run, hf = tmp_path / "cls", tmp_path / "hf"
    assert run_cli(capsys, "finetune-cls", "--base", base / "base", "--data", sentiment, *CLS,
                   "--epochs", "2", "--warmup-steps", "0", *extra, "--out", run)[0] == 0
    code, said, _ = run_cli(capsys, "convert", run, "--out", hf)
    assert code == 0 and "as GPT2ForSequenceClassification" in said
    ft = load_finetuned(run, "latest", None)
    texts = ["great fun stone cloud paper", "awful day", "plain note glass music table light green"]
    ids, _ = batching.encode_all(texts, ft.tokenizer, ft.spec.model.context_length)
    pad = ft.tokenizer.eot_id
    tokens, lengths = batching.pad_rows(ids, len(ids), max(map(len, ids)), pad)
    ours = np.asarray(logits(ft.params, tokens, lengths, ft.spec.model, pooling="last", lora=ft.spec.lora))
    model = GPT2ForSequenceClassification.from_pretrained(hf).eval()
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                       attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The head's bias, folded into the final norm's shift on export, is not negligible.
    assert np.abs(np.asarray(ft.params["head"]["bias"])).max() > 1e-3


def test_a_mean_pooling_classifier_is_not_exported(tmp_path):
    from gptjax.errors import GptjaxError
    from gptjax.hf.classifier import save_classifier
    with pytest.raises(GptjaxError, match="only --pooling last classifiers can be exported"):
        save_classifier({}, None, {}, ("a", "b"), "mean", tmp_path / "hf", pad_id=0)
    assert not (tmp_path / "hf").exists()
