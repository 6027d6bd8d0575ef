"""Every bad input gets one line on stderr, exit code 2, and nothing written or damaged."""

import asyncio
import logging
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import TINY_RUN, fails_cleanly, run_cli

from gptjax.cli import main


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("prepared") / "byte"
    assert main(["prepare", str(corpus_file), "--out", str(out), "--tokenizer", "byte",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("runs") / "char"
    assert main(["train", "--data", str(char_data), "--out", str(out), *TINY_RUN,
                 "--max-steps", "3", "--max-new-tokens", "0"]) == 0
    return out


@pytest.mark.parametrize("content", ["", "  \n\t\n  "])
def test_empty_or_whitespace_corpus(tmp_path, capsys, content):
    (tmp_path / "c.txt").write_text(content)
    fails_cleanly(capsys, "prepare", tmp_path / "c.txt", "--out", tmp_path / "out",
                  "--tokenizer", "char", "--no-progress", match="empty or whitespace")
    assert not (tmp_path / "out").exists()


def test_corpus_shorter_than_one_window(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("just a few words, not enough for a window")
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "d"),
                 "--tokenizer", "byte", "--no-progress"]) == 0
    fails_cleanly(capsys, "train", "--data", tmp_path / "d", "--out", tmp_path / "run", *TINY_RUN,
                  match="fewer than one window")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,match", [
    (["prepare", "MISSING/x.txt", "--out", "OUT"], "input not found"),
    (["train", "--data", "MISSING", "--out", "OUT"], "not prepared data"),
    (["generate", "--run", "MISSING"], "not a gptjax run"),
    (["eval", "--run", "MISSING"], "not a gptjax run"),
])
def test_missing_paths(tmp_path, capsys, argv, match):
    argv = [a.replace("MISSING", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out"))
            for a in argv]
    fails_cleanly(capsys, *argv, match=match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,match", [
    (["prepare", "IN", "--out", "OUT", "--tokenizer", "sentencepiece"], "invalid choice"),
    (["train", "--out", "OUT", "--tokenizer", "wordpiece"], "invalid choice"),
    (["train", "--out", "OUT", "--preset", "gpt5"], "invalid choice"),
    (["train", "--out", "OUT", "--n-layers", "3"], "unrecognized arguments"),
    (["train", "--out", "OUT", "--batch-size", "many"], "invalid int value"),
])
def test_unknown_choices_and_fields(tmp_path, capsys, corpus_file, argv, match):
    argv = [a.replace("IN", str(corpus_file)).replace("OUT", str(tmp_path / "out")) for a in argv]
    fails_cleanly(capsys, *argv, match=match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,match", [
    (["--d-model", "30", "--n-head", "4"], "divisible by model.n_head"),
    (["--batch-size", "0"], "train.batch_size must be positive"),
    (["--batch-size=-4"], "train.batch_size must be positive"),
    (["--max-steps", "0"], "train.max_steps must be positive"),
    (["--max-steps", "50", "--warmup-steps", "50"], "must be less than train.max_steps"),
    (["--lr", "0"], "train.lr must be positive"),
    (["--lr=-1e-3"], "train.lr must be positive"),
    (["--lr", "nan"], "train.lr must be positive"),
    (["--batch-size", "6", "--grad-accum", "4"], "divisible by train.grad_accum"),
    # float32 (the default) is refused on a GPU too; on CPU cuDNN is missing altogether.
    (["--attention-impl", "cudnn"], "attention_impl=cudnn cannot run here"),
])
def test_invalid_config_values(tmp_path, capsys, char_data, flags, match):
    fails_cleanly(capsys, "train", "--data", char_data, "--out", tmp_path / "out", *flags,
                  match=match)
    assert not (tmp_path / "out").exists()


def test_token_ids_outside_the_vocabulary(tmp_path, capsys, char_data):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(char_data, bad)
    ids = np.fromfile(bad / "val.bin", dtype=np.uint16)
    ids[-1] = 60000
    ids.tofile(bad / "val.bin")
    fails_cleanly(capsys, "train", "--data", bad, "--out", tmp_path / "out", *TINY_RUN,
                  match="outside the vocabulary")
    assert not (tmp_path / "out").exists()


def test_data_with_a_different_tokenizer(tmp_path, capsys, char_data, byte_data, char_run):
    fails_cleanly(capsys, "train", "--data", char_data, "--tokenizer", "byte",
                  "--out", tmp_path / "out", match="uses the char tokenizer")
    assert not (tmp_path / "out").exists()
    fails_cleanly(capsys, "eval", "--run", char_run, "--data", byte_data,
                  match="uses the byte tokenizer")


def test_a_failing_resume_leaves_the_run_untouched(tmp_path, capsys, byte_data, char_run):
    before = {p: p.read_bytes() for p in char_run.rglob("*") if p.is_file()}
    fails_cleanly(capsys, "train", "--out", char_run, "--data", byte_data, "--no-progress",
                  match="uses the byte tokenizer")
    fails_cleanly(capsys, "train", "--out", char_run, "--n-layer", "3", "--no-progress",
                  match="model.n_layer")
    after = {p: p.read_bytes() for p in char_run.rglob("*") if p.is_file()}
    assert after == before


def test_out_dir_that_is_not_a_run(tmp_path, capsys, char_data):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    fails_cleanly(capsys, "train", "--data", char_data, "--out", tmp_path / "mine", *TINY_RUN,
                  match="not a gptjax run")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("flags,match", [
    (["--temperature=-1"], "temperature must be"),
    (["--temperature", "nan"], "temperature must be"),
    (["--top-k", "0"], "top_k must be an integer >= 1"),
    (["--seed", "9223372036854775808"], "seed must be an integer in"),
    (["--top-p", "0"], "top_p must be in"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--max-new-tokens=-5"], "max_new_tokens must be an integer in"),
    (["--max-new-tokens", "1000000000"], "max_new_tokens must be an integer in"),
])
def test_bad_sampling_settings(capsys, char_run, flags, match):
    fails_cleanly(capsys, "generate", "--run", char_run, *flags, match=match)


def test_prompt_with_characters_outside_a_char_vocabulary(capsys, char_run):
    code, out, err = run_cli(capsys, "generate", "--run", char_run, "--prompt", "Zebra ∑")
    assert code == 2 and "not in the vocabulary" in err
    assert out == ""  # the prompt is not echoed before the error


@pytest.mark.parametrize("text", [
    "completely different letters: qxzj QXZJ 0123456789 " * 200,
    # more characters than the run's vocabulary: still named as a different tokenizer
    "".join(chr(c) for c in range(0x100, 0x200)) * 40])
def test_char_data_with_another_vocabulary(tmp_path, capsys, char_run, text):
    (tmp_path / "other.txt").write_text(text)
    assert main(["prepare", str(tmp_path / "other.txt"), "--out", str(tmp_path / "d"),
                 "--tokenizer", "char", "--no-progress"]) == 0
    fails_cleanly(capsys, "eval", "--run", char_run, "--data", tmp_path / "d",
                  match="different char tokenizer")


def test_classify_on_a_run_that_is_not_a_classifier(capsys, char_run):
    fails_cleanly(capsys, "classify", "--run", char_run, "hello", match="is not a classifier run")


def test_damaged_prepared_data_is_named(tmp_path, capsys, char_run, char_data):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(char_data, bad)
    (bad / "train.bin").write_bytes(b"")
    fails_cleanly(capsys, "eval", "--run", char_run, "--data", bad, match="train.bin holds 0 tokens")
    meta = json.loads((bad / "meta.json").read_text())
    del meta["dtype"]
    (bad / "meta.json").write_text(json.dumps(meta))
    fails_cleanly(capsys, "eval", "--run", char_run, "--data", bad, match="has no 'dtype' field")


def test_failed_prepare_removes_the_folders_it_created(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("   ")
    fails_cleanly(capsys, "prepare", tmp_path / "blank.txt", "--out", tmp_path / "new" / "deep" / "out",
                  "--tokenizer", "byte", "--no-progress", match="empty or whitespace")
    assert not (tmp_path / "new").exists()


def test_existing_empty_out_stays_empty_when_the_config_fails_to_fit(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    fails_cleanly(capsys, "train", "--out", tmp_path / "out", "--context-length", "100000",
                  "--no-progress", match="fewer than one window")
    assert list((tmp_path / "out").iterdir()) == []


def test_out_below_a_file(tmp_path, capsys, char_data):
    (tmp_path / "file").write_text("x")
    fails_cleanly(capsys, "train", "--data", char_data, "--out", tmp_path / "file" / "run",
                  *TINY_RUN, match="Not a directory")


@pytest.mark.parametrize("flags,match", [
    (["--seed=-1"], "train.seed must be in"),
    (["--seed", str(2**40)], "train.seed must be in"),
])
def test_seed_out_of_range(tmp_path, capsys, char_data, flags, match):
    fails_cleanly(capsys, "train", "--data", char_data, "--out", tmp_path / "out", *TINY_RUN,
                  *flags, match=match)
    assert not (tmp_path / "out").exists()


def test_bad_checkpoint_name(capsys, char_run):
    fails_cleanly(capsys, "generate", "--run", char_run, "--checkpoint", "newest",
                  match="--checkpoint must be latest, best or a step")
    fails_cleanly(capsys, "eval", "--run", char_run, "--checkpoint", "999", match="no checkpoint 999")
    fails_cleanly(capsys, "eval", "--run", char_run, "--checkpoint", "2", match="checkpoints; it has 3")


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, char_data):
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(char_data), "--out", str(run_dir), *TINY_RUN,
                 "--max-steps", "6", "--max-new-tokens", "0"]) == 0  # checkpoints 3 and 6
    latest = run_dir / "checkpoints" / "6" / "params"
    for f in latest.rglob("*"):  # the array data emptied, the metadata left as it was
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # Asked for by number, it is refused; as "latest", the newest good one is used, said once.
    fails_cleanly(capsys, "eval", "--run", run_dir, "--checkpoint", "6", match="checkpoint 6 in ")
    fails_cleanly(capsys, "generate", "--run", run_dir, "--checkpoint", "6", match="cannot be read")
    code, out, err = run_cli(capsys, "eval", "--run", run_dir)
    assert code == 0 and "step 3: val loss" in out, err
    assert len(err.splitlines()) == 1 and "checkpoint 6 in " in err and "using checkpoint 3" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # As a command, too: the reads orbax abandoned finish on tensorstore's threads after its
    # event loop closed, and each printed a traceback around the error line unless dropped
    # (nearly every run did on this machine).
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "gptjax", "eval", "--run", str(run_dir),
                               "--checkpoint", "6"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "checkpoint 6 in " in done.stderr


async def _read_array_index_and_device_put():  # named as orbax's per-shard read
    pass


async def another_coroutine():
    pass


def test_only_the_reports_of_abandoned_reads_are_dropped(monkeypatch, caplog):
    from gptjax.training import orbax_quiet
    seen = []
    log = logging.getLogger("asyncio")
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(log, "filters", [])  # nothing of this test outlives it
    orbax_quiet.drop_reports_of_abandoned_reads()
    hook, filters = sys.unraisablehook, list(log.filters)
    orbax_quiet.drop_reports_of_abandoned_reads()  # once per process: not wrapped twice
    assert sys.unraisablehook is hook and log.filters == filters and len(filters) == 1
    loop = asyncio.new_event_loop()
    loop.close()

    def report(fn, obj=None):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                                     exc_traceback=e.__traceback__, object=obj,
                                                     err_msg=None))

    report(lambda: loop.call_soon_threadsafe(print))  # what an abandoned read raises: dropped
    report(lambda: loop.call_soon_threadsafe(print), obj="something")
    report(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
    report(lambda: 1 / 0)
    for make in (_read_array_index_and_device_put, another_coroutine):
        coroutine = make()
        report(lambda: (_ for _ in ()).throw(KeyError("read")), obj=coroutine)  # dropped, kept
        coroutine.close()
    assert [type(u.exc_value) for u in seen] == [RuntimeError, RuntimeError, ZeroDivisionError,
                                                 KeyError]
    assert seen[-1].object.__qualname__ == "another_coroutine"
    read_error = ValueError("OUT_OF_RANGE: ... [tensorstore_spec='{}']")
    for message, error in (("Future exception was never retrieved", read_error),
                           ("Future exception was never retrieved", ValueError("other")),
                           ("Exception in callback", read_error)):
        log.error(f"{message}\nfuture: <Future>", exc_info=(ValueError, error, None))
    assert [r.getMessage().split("\n")[0] for r in caplog.records] == [
        "Future exception was never retrieved", "Exception in callback"]
    assert str(caplog.records[0].exc_info[1]) == "other"


def test_jsonl_with_unpaired_surrogates_is_replaced_not_fatal(tmp_path, capsys):
    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud800 pair, fine \\ud83d\\ude00 pair"}\n')
    code, out, err = run_cli(capsys, "prepare", tmp_path / "s.jsonl", "--out", tmp_path / "d",
                             "--tokenizer", "byte", "--no-progress")
    assert code == 0, err
    assert "1 invalid UTF-8" in out
    text = (tmp_path / "d" / "train.bin").read_bytes() + (tmp_path / "d" / "val.bin").read_bytes()
    decoded = bytes(np.frombuffer(text, np.uint16)[:-1].astype(np.uint8)).decode()
    assert decoded == "broken \ufffd pair, fine 😀 pair"


def test_a_run_that_never_checkpointed_can_be_started_over(tmp_path, capsys, char_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"model": {"n_layer": 99}, "train": {}, "data": {}}')
    (out / "tokenizer.json").write_text('{"kind": "byte"}')
    code, _, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                           "--n-layer", "2", "--max-steps", "3", "--max-new-tokens", "0")
    assert code == 0, err
    assert '"n_layer": 2' in (out / "config.json").read_text()
