"""scripts/download_finetune_data.py with file:// URLs to fixtures built here (no network)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
from conftest import repo_script

TSV = b"ham\tsee you at 5\nspam\tWIN a \"prize\" now\n"
INSTRUCTIONS = json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]).encode()


@pytest.fixture(scope="module")
def script():
    return repo_script("scripts", "download_finetune_data")


@pytest.fixture
def sources(tmp_path):
    """A zip holding SMSSpamCollection and an instruction file, plus matching CLI arguments."""
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "sms.zip", "w") as archive:
        archive.writestr("readme", "not this one")
        archive.writestr("SMSSpamCollection", TSV)
    (src / "instructions.json").write_bytes(INSTRUCTIONS)
    return ["--sms-url", (src / "sms.zip").as_uri(),
            "--instructions-url", (src / "instructions.json").as_uri(),
            "--sha256-sms", hashlib.sha256(TSV).hexdigest(),
            "--sha256-instructions", hashlib.sha256(INSTRUCTIONS).hexdigest()]


def test_default_hashes_are_the_published_ones(script):
    assert script.SMS_SHA256 == "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
    assert script.INSTRUCTIONS_SHA256 == \
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
    args = script.parse_args([])
    assert args.sha256_sms == script.SMS_SHA256 and args.sms_url.startswith("https://")
    assert script.SENTIMENT_SHA256 == "0e1a06c4900fdae46091d031068601e3773ba067c7cecb5b0da1dcba5ce989a6"
    assert not args.sentiment and args.sentiment_agreement == "all"


def test_download_extract_verify_then_skip(script, sources, tmp_path, capsys):
    out = tmp_path / "data" / "nested"
    assert script.main(["--out", str(out), *sources]) == 0
    assert (out / "sms_spam.tsv").read_bytes() == TSV
    assert (out / "instruction-data.json").read_bytes() == INSTRUCTIONS
    assert sorted(p.name for p in out.iterdir()) == ["instruction-data.json", "sms_spam.tsv"]
    assert capsys.readouterr().out.count("downloaded, sha256 ok") == 2

    stamp = (out / "sms_spam.tsv").stat().st_mtime_ns
    assert script.main(["--out", str(out), *sources]) == 0
    assert capsys.readouterr().out.count("already present, sha256 ok") == 2
    assert (out / "sms_spam.tsv").stat().st_mtime_ns == stamp


def test_wrong_hash_writes_nothing(script, sources, tmp_path, capsys):
    out = tmp_path / "data"
    wrong = "0" * 64
    argv = ["--out", str(out), *sources]
    argv[argv.index("--sha256-sms") + 1] = wrong
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sms_spam.tsv from file:")
    assert f"expected {wrong}, got {hashlib.sha256(TSV).hexdigest()}" in err
    assert list(out.iterdir()) == []  # no partial or temporary files


def test_existing_file_with_other_contents_is_not_overwritten(script, sources, tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "sms_spam.tsv").write_bytes(b"mine")
    assert script.main(["--out", str(out), *sources]) == 2
    assert "already exists with sha256" in capsys.readouterr().err
    assert (out / "sms_spam.tsv").read_bytes() == b"mine"


@pytest.mark.parametrize("bad, expected", [
    ("missing.zip", "cannot download file:"),
    ("instructions.json", "is not a valid zip archive"),
    ("other.zip", "has no member 'SMSSpamCollection'"),
])
def test_download_failures_exit_2_with_one_line(script, sources, tmp_path, capsys, bad, expected):
    with zipfile.ZipFile(tmp_path / "src" / "other.zip", "w") as archive:
        archive.writestr("something", "else")
    argv = ["--out", str(tmp_path / "data"), *sources]
    argv[argv.index("--sms-url") + 1] = (tmp_path / "src" / bad).as_uri()
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert list((tmp_path / "data").iterdir()) == []


PHRASES = ("Profit rose 20 % .@positive\n"
           "The company , based in Espoo , makes paper .@neutral\n"
           "Sales fell in the caf\xe9 unit@negative\n").encode("iso-8859-1")


@pytest.fixture
def sentiment(sources, tmp_path):
    """The base arguments plus a Financial PhraseBank-shaped zip (ISO-8859-1 members)."""
    zipped = tmp_path / "src" / "phrasebank.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("FinancialPhraseBank-v1.0/Sentences_AllAgree.txt", PHRASES)
        archive.writestr("FinancialPhraseBank-v1.0/Sentences_50Agree.txt", PHRASES + b"More@neutral\n")
    return [*sources, "--sentiment", "--sentiment-url", zipped.as_uri(),
            "--sha256-sentiment", hashlib.sha256(zipped.read_bytes()).hexdigest()]


def test_sentiment_set_is_opt_in_converted_to_jsonl_and_skipped_when_present(script, sentiment, sources,
                                                                              tmp_path, capsys):
    out = tmp_path / "data"
    assert script.main(["--out", str(out), *sources]) == 0
    assert not (out / "financial_phrasebank.jsonl").exists()  # non-commercial licence: opt-in
    assert script.main(["--out", str(out), *sentiment]) == 0
    said = capsys.readouterr().out
    assert "financial_phrasebank.jsonl: downloaded, sha256 ok" in said and "CC BY-NC-SA 3.0" in said
    records = [json.loads(line) for line in (out / "financial_phrasebank.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["positive", "neutral", "negative"]
    assert records[2]["text"] == "Sales fell in the caf\u00e9 unit"  # decoded from ISO-8859-1
    assert script.main(["--out", str(out), *sentiment]) == 0
    assert "financial_phrasebank.jsonl: already present, sha256 ok" in capsys.readouterr().out
    (out / "financial_phrasebank.jsonl").write_text("edited\n")
    assert script.main(["--out", str(out), *sentiment]) == 2
    assert "is not the one this script writes" in capsys.readouterr().err
    assert (out / "financial_phrasebank.jsonl").read_text() == "edited\n"


def test_sentiment_agreement_picks_the_member(script, sentiment, tmp_path):
    out = tmp_path / "data"
    assert script.main(["--out", str(out), *sentiment, "--sentiment-agreement", "50"]) == 0
    assert len((out / "financial_phrasebank.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("damage, expected", [
    ("hash", "has the wrong sha256"),
    ("label", "line 1 is not 'sentence@label' with label one of negative, neutral, positive"),
])
def test_a_bad_sentiment_download_writes_nothing(script, sentiment, tmp_path, capsys, damage, expected):
    argv = ["--out", str(tmp_path / "data"), *sentiment]
    if damage == "hash":
        argv[argv.index("--sha256-sentiment") + 1] = "0" * 64
    else:
        bad = tmp_path / "src" / "bad.zip"
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("FinancialPhraseBank-v1.0/Sentences_AllAgree.txt", b"Fine@great\n")
        argv[argv.index("--sentiment-url") + 1] = bad.as_uri()
        argv[argv.index("--sha256-sentiment") + 1] = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["instruction-data.json", "sms_spam.tsv"]
