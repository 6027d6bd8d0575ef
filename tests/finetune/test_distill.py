"""Knowledge distillation: the loss against torch's KL and a hand mix, a language-model
student and a classifier student pulled towards their teachers by `gptjax distill`, and
bad input refused in one line with nothing written."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN, fails_cleanly, run_cli

from gptjax import config as C
from gptjax import model
from gptjax.cli import config_file, main
from gptjax.cli.app import _parser
from gptjax.errors import GptjaxError
from gptjax.finetune.cls import classify
from gptjax.finetune.distill import distill_lm, load_student, load_teacher
from gptjax.finetune.distill_loss import DistillLoss, make_lm_loss_sum, make_lm_val_sums, soft_kl
from gptjax.finetune.settings import Tuning
from gptjax.runs.load import load_run

WORDS = "apple river stone cloud paper glass music table light green".split()
OPENERS = {"positive": "great fun", "negative": "awful day", "neutral": "plain note"}
COMMON = ["--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file, char_data):
    """A byte-level teacher (2 blocks of 64 wide, context 64), a classifier teacher tuned
    from it on three classes, and a char-level run (another tokenizer)."""
    root = tmp_path_factory.mktemp("distill")
    assert main(["prepare", str(corpus_file), "--out", str(root / "data"), "--tokenizer", "byte",
                 "--no-progress"]) == 0
    assert main(["train", "--data", str(root / "data"), "--out", str(root / "teacher"), *TINY_RUN,
                 "--d-model", "64", "--context-length", "64", "--max-steps", "60", "--lr", "3e-3",
                 # Evaluated (and saved) every 20 steps, not 3: the same teacher bit for bit,
                 # its latest checkpoint still step 60, for fewer evaluations and saves.
                 "--eval-every", "20", "--max-new-tokens", "0"]) == 0
    rng = np.random.default_rng(1)
    rows = [{"text": f"{OPENERS[label]} {' '.join(rng.choice(WORDS, 3))}", "label": label}
            for i in range(90) for label in [("positive", "negative", "neutral")[i % 3]]]
    (root / "sentiment.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["finetune-cls", "--base", str(root / "teacher"), "--data", str(root / "sentiment.jsonl"),
                 "--out", str(root / "cls-teacher"), "--epochs", "4", "--lr", "3e-3", "--base-lr", "3e-3",
                 *COMMON]) == 0
    assert main(["train", "--data", str(char_data), "--out", str(root / "char"), *TINY_RUN,
                 "--max-steps", "3", "--max-new-tokens", "0"]) == 0
    return root


def test_soft_kl_is_torchs_kl_divergence_times_t_squared_and_its_gradient_t_times_q_minus_p():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    s, t, T = rng.normal(size=(5, 11)) * 3, rng.normal(size=(5, 11)) * 3, 2.5
    got = np.asarray(soft_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T))
    F = torch.nn.functional
    want = F.kl_div(F.log_softmax(torch.tensor(s) / T, -1), F.log_softmax(torch.tensor(t) / T, -1),
                    reduction="none", log_target=True).sum(-1) * T ** 2
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: soft_kl(x, jnp.asarray(t, jnp.float32), T).sum())(jnp.asarray(s, jnp.float32))
    q, p = jax.nn.softmax(s / T), jax.nn.softmax(t / T)
    np.testing.assert_allclose(np.asarray(grad), T * (q - p), rtol=1e-4, atol=1e-6)


def test_the_language_model_loss_mixes_the_two_terms_over_the_shared_vocabulary():
    student = C.preset("tiny", vocab_size=257)
    teacher = C.preset("tiny", vocab_size=320, d_model=48, n_layer=3)  # padded differently
    params = {"gpt": model.init(student, jax.random.PRNGKey(0)),
              "teacher": model.init(teacher, jax.random.PRNGKey(1))}
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, 257)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    alphas = (0.0, 1.0, 0.3)

    @jax.jit  # one compile for everything: the mixes, and the two terms computed apart
    def losses(params, batch):
        mixes = [make_lm_loss_sum(student, teacher, 257, DistillLoss(a, 3.0))(params, batch, None)
                 for a in alphas]
        ce, _ = model.loss_sum(params["gpt"], batch, student)
        s = model.apply(params["gpt"], batch["inputs"], student)
        t = model.apply(params["teacher"], batch["inputs"], teacher)[..., :257]
        return mixes, ce, soft_kl(s, t, 3.0).sum()

    mixes, ce, kl = jax.device_get(losses(params, batch))
    assert [float(count) for _, count in mixes] == [32.0] * 3
    total = {a: float(loss) for a, (loss, _) in zip(alphas, mixes)}
    assert total[0.0] == pytest.approx(float(ce), rel=1e-6)
    assert total[1.0] == pytest.approx(float(kl), rel=1e-5)
    assert total[0.3] == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)


def test_validation_kl_leaves_out_the_padding_rows():
    student = C.preset("tiny", vocab_size=300)  # padded past the 257 ids the KL compares
    teacher = C.preset("tiny", vocab_size=257, n_layer=1)
    params = {"gpt": model.init(student, jax.random.PRNGKey(0)),
              "teacher": model.init(teacher, jax.random.PRNGKey(1))}
    real = jax.random.randint(jax.random.PRNGKey(2), (1, 17), 0, 257)
    row = {"inputs": real[:, :-1], "targets": real[:, 1:]}
    padded = {k: jnp.concatenate([v, v[:, ::-1]]) for k, v in row.items()}  # a row that must not count
    padded["weights"] = jnp.array([[1.0] * 16, [0.0] * 16])
    val_sums = jax.jit(make_lm_val_sums(student, teacher, 257))
    (ce_a, kl_a, n), (ce_b, kl_b, m) = jax.device_get((val_sums(params, row), val_sums(params, padded)))
    assert n == m == 16 and float(kl_b) == pytest.approx(float(kl_a), rel=1e-6)
    assert float(ce_b) == pytest.approx(float(ce_a), rel=1e-6)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_preset_student_learns_the_teachers_next_token_distribution(runs, tmp_path, capsys):
    out = tmp_path / "student"
    code, said, err = run_cli(capsys, "distill", "--teacher", runs / "teacher", "--student", "tiny",
                              "--data", runs / "data", "--out", out, "--alpha", "1", "--temperature", "1",
                              "--max-steps", "40", "--eval-every", "20", *COMMON)
    assert code == 0, err
    first = float(said.split("KL to the teacher ")[1].split(";")[0])
    kls = [r["val_kl"] for r in _records(out) if "val_kl" in r]
    assert len(kls) == 2 and kls[-1] < 0.6 * first, (first, kls)
    spec = json.loads((out / "finetune.json").read_text())
    assert spec["task"] == "distill" and spec["base"] == {"kind": "preset", "preset": "tiny", "seed": 0}
    assert spec["settings"]["distill"]["teacher"]["checkpoint"] == 60
    student = load_run(out)  # every weight is in the run: no base to find
    assert student.config.model.vocab_size == load_run(runs / "teacher").config.model.vocab_size
    assert student.config.model.d_model == 32 and student.step == 40
    code, said, _ = run_cli(capsys, "generate", "--run", out, "--prompt", "The", "--max-new-tokens", "5")
    assert code == 0
    # Its finetune.json repeats the command: the same run again, which only reports itself.
    code, said, err = run_cli(capsys, "distill", "--config", out / "finetune.json", "--out", out,
                              "--no-progress")
    assert code == 0 and "it had finished" in said, err

    # ... and with another teacher typed, that teacher's own latest checkpoint, not step 60.
    def parsed(*flags):
        return config_file.parse_args(_parser(), ["distill", "--config", str(out / "finetune.json"),
                                                  "--out", "x", *flags])
    assert parsed().teacher_checkpoint == "60"
    assert parsed("--teacher", "another").teacher_checkpoint == "latest"


def test_a_classifier_student_learns_the_teachers_class_probabilities(runs, tmp_path, capsys):
    out = tmp_path / "cls-student"
    code, said, err = run_cli(capsys, "distill", "--teacher", runs / "cls-teacher", "--student", "tiny",
                              "--data", runs / "sentiment.jsonl", "--out", out, "--alpha", "1",
                              "--epochs", "8", "--eval-every", "0", "--base-lr", "3e-3", *COMMON)
    assert code == 0, err
    report = json.loads((out / "test_report.json").read_text())
    assert set(report["per_class"]) == set(OPENERS)
    texts = [f"{opener} stone paper light" for opener in OPENERS.values()]
    classes, teacher = classify(runs / "cls-teacher", texts)
    assert classify(out, texts)[0] == classes
    student = classify(out, texts)[1]
    kl = float(np.sum(teacher * (np.log(teacher) - np.log(student))))
    uniform = float(np.sum(teacher * (np.log(teacher) - np.log(1 / 3))))
    assert kl < 0.5 * uniform, (kl, uniform)
    assert (student.argmax(-1) == teacher.argmax(-1)).all()
    code, said, err = run_cli(capsys, "distill", "--config", out / "finetune.json", "--out", out,
                              "--no-progress")
    assert code == 0 and "it had finished" in said, err


@pytest.mark.parametrize("extra, match", [
    (["--student", "CHAR"], "must use the same tokenizer"),
    (["--student", "tiny", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--student", "tiny", "--temperature", "0"], "--temperature must be positive"),
    (["--student", "tiny", "--lora-rank", "2"], "--lora-rank needs a student run"),
    (["--student", "nope"], "neither a gptjax run folder nor a preset"),
    (["--student", "tiny", "--text-column", "body"], "--text-column is for a classifier teacher"),
    (["--student", "LONG"], "longer than the teacher's (64)"),
    (["--student", "tiny", "--unfreeze", "gradual:1"], "--unfreeze needs a student run"),
    (["--student", "tiny", "--student-checkpoint", "3"], "--student-checkpoint is for a student run"),
    (["--student", "tiny", "--data", "FILE"], "is not a folder: a language-model teacher"),
])
def test_bad_distillation_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, corpus_file,
                                                               extra, match):
    if "LONG" in extra and not (runs / "long").exists():  # a byte run with a longer context
        assert main(["train", "--data", str(runs / "data"), "--out", str(runs / "long"), *TINY_RUN,
                     "--context-length", "96", "--max-steps", "3", "--max-new-tokens", "0"]) == 0
    named = {"CHAR": runs / "char", "LONG": runs / "long", "FILE": runs / "sentiment.jsonl"}
    extra = [str(named.get(a, a)) for a in extra]
    out = tmp_path / "out"
    fails_cleanly(capsys, "distill", "--teacher", runs / "teacher", "--data", runs / "data", "--out", out,
                  *extra, *COMMON, match=match)
    assert not out.exists()


def test_the_drivers_refuse_to_freeze_a_preset_students_random_weights(runs, tmp_path):
    teacher = load_teacher(runs / "teacher")
    student = load_student("tiny", teacher, Tuning())
    with pytest.raises(GptjaxError, match="--lora-rank needs a student run"):
        distill_lm(teacher, student, str(runs / "data"), DistillLoss(), Tuning(lora_rank=2), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_classifier_teacher_needs_data_with_its_classes(runs, tmp_path, capsys):
    other = tmp_path / "two.jsonl"
    other.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n"
                             for i in range(20)))
    fails_cleanly(capsys, "distill", "--teacher", runs / "cls-teacher", "--student", "tiny", "--data", other,
                  "--out", tmp_path / "out", *COMMON, match="must be the same")
    assert not (tmp_path / "out").exists()
