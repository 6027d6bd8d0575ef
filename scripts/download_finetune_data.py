#!/usr/bin/env python3
"""Download the fine-tuning data sets: SMS Spam Collection (classification), instruction
data and, with --sentiment, Financial PhraseBank (three-class sentiment).

    python scripts/download_finetune_data.py --out data/ [--sentiment]

Writes sms_spam.tsv (the `SMSSpamCollection` member of the UCI zip) and
instruction-data.json into --out, each checked against a known sha256. --sentiment adds
financial_phrasebank.jsonl: {"text", "label"} records (negative, neutral, positive) from
the sentences of the chosen annotator agreement, out of the published zip, whose sha256 is
checked (the JSONL's own hash is kept beside it in a .sha256 file). Its licence, CC
BY-NC-SA 3.0, allows non-commercial use only, hence the opt-in flag. Every file is
written under a temporary name in the target folder and renamed only once verified,
so an interrupted or failed run leaves nothing half-written. Files already present
with the right hash are skipped. Only the standard library is used, so this runs
before gptjax is installed. Failures print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_MEMBER = "SMSSpamCollection"
SMS_NAME = "sms_spam.tsv"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
INSTRUCTIONS_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
                    "ch07/01_main-chapter-code/instruction-data.json")
INSTRUCTIONS_NAME = "instruction-data.json"
INSTRUCTIONS_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
SENTIMENT_URL = ("https://huggingface.co/datasets/takala/financial_phrasebank/resolve/main/data/"
                 "FinancialPhraseBank-v1.0.zip")
# The zip's sha256 as Hugging Face datasets recorded it (681,890 bytes).
SENTIMENT_SHA256 = "0e1a06c4900fdae46091d031068601e3773ba067c7cecb5b0da1dcba5ce989a6"
SENTIMENT_NAME = "financial_phrasebank.jsonl"
AGREEMENTS = {"all": "AllAgree", "75": "75Agree", "66": "66Agree", "50": "50Agree"}
SENTIMENT_LABELS = ("negative", "neutral", "positive")
TIMEOUT_S = 60.0
MAX_BYTES = 64 << 20  # every file is well under 1 MB; a runaway reply is refused


class DownloadError(Exception):
    """A download, extraction or checksum failure, reported as one line."""


def sha256_of(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def fetch(url: str, timeout: float = TIMEOUT_S) -> bytes:
    """The bytes at `url` (http, https or file); DownloadError on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            data = reply.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot download {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets; ValueError for a malformed URL
        raise DownloadError(f"cannot download {url}: {e}") from None
    if len(data) > MAX_BYTES:
        raise DownloadError(f"cannot download {url}: larger than {MAX_BYTES >> 20} MiB")
    return data


def zip_member(data: bytes, member: str, url: str) -> bytes:
    """The bytes of `member` inside the zip archive `data` downloaded from `url`."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(member)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{url} is not a valid zip archive ({e})") from None
    except KeyError:
        raise DownloadError(f"{url} has no member {member!r}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(path: Path, url: str, sha256: str, member: str | None = None) -> str:
    """Make `path` hold the verified file from `url`; returns 'present' or 'downloaded'."""
    if path.exists():
        have = sha256_of(path.read_bytes())
        if have == sha256:
            return "present"
        # Someone else's file (or another version): never overwritten silently.
        raise DownloadError(f"{path} already exists with sha256 {have}, expected {sha256}; "
                            f"move it away to download it again")
    data = fetch(url)
    if member is not None:
        data = zip_member(data, member, url)
    got = sha256_of(data)
    if got != sha256:
        raise DownloadError(f"{path.name} from {url} has the wrong sha256: expected {sha256}, "
                            f"got {got}")
    write_atomic(path, data)
    return "downloaded"


def phrasebank_records(member: bytes, name: str) -> bytes:
    """Financial PhraseBank's 'sentence@label' lines (ISO-8859-1) as UTF-8 JSONL records."""
    lines = []
    for number, line in enumerate(member.decode("iso-8859-1").splitlines(), 1):
        if not line.strip():
            continue
        sentence, _, label = line.rpartition("@")
        label = label.strip()
        if not sentence.strip() or label not in SENTIMENT_LABELS:
            raise DownloadError(f"{name} line {number} is not 'sentence@label' with label one of "
                                f"{', '.join(SENTIMENT_LABELS)}")
        lines.append(json.dumps({"text": sentence.strip(), "label": label}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def install_sentiment(path: Path, url: str, sha256: str, agreement: str) -> str:
    """Make `path` hold the JSONL converted from the verified zip; 'present' or 'downloaded'.

    The JSONL is derived, so no published hash exists for it: its hash and the source's
    are written to PATH.sha256, which a later run checks instead."""
    stamp = path.with_name(path.name + ".sha256")
    member = f"FinancialPhraseBank-v1.0/Sentences_{AGREEMENTS[agreement]}.txt"
    if path.exists():
        have = sha256_of(path.read_bytes())
        if stamp.exists() and stamp.read_text().split() == [have, sha256, member]:
            return "present"
        raise DownloadError(f"{path} already exists and is not the one this script writes from "
                            f"{member} (--sentiment-agreement {agreement}) of the zip with sha256 "
                            f"{sha256}; move it away to download it again")
    data = fetch(url)
    got = sha256_of(data)
    if got != sha256:
        raise DownloadError(f"{url} has the wrong sha256: expected {sha256}, got {got}")
    records = phrasebank_records(zip_member(data, member, url), member)
    # The stamp first: one left without its file only means a fresh download next time.
    write_atomic(stamp, f"{sha256_of(records)} {sha256} {member}\n".encode())
    write_atomic(path, records)
    return "downloaded"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Download the SMS spam and instruction data sets "
                                            "used for fine-tuning (and, with --sentiment, a "
                                            "three-class sentiment set), verified by sha256.")
    p.add_argument("--out", default="data", help="folder to write into (default: data)")
    p.add_argument("--sms-url", default=SMS_URL, help="zip archive holding SMSSpamCollection")
    p.add_argument("--instructions-url", default=INSTRUCTIONS_URL, help="instruction-data.json")
    p.add_argument("--sha256-sms", default=SMS_SHA256, metavar="HEX",
                   help="expected sha256 of the extracted sms_spam.tsv (default: the known one)")
    p.add_argument("--sha256-instructions", default=INSTRUCTIONS_SHA256, metavar="HEX",
                   help="expected sha256 of instruction-data.json (default: the known one)")
    p.add_argument("--sentiment", action="store_true",
                   help="also Financial PhraseBank (Malo et al. 2014; CC BY-NC-SA 3.0, "
                   "non-commercial use only): financial news sentences labelled negative, neutral "
                   "or positive, written as financial_phrasebank.jsonl")
    p.add_argument("--sentiment-agreement", choices=tuple(AGREEMENTS), default="all",
                   help="which sentences: those all annotators agreed on (2,264), or at least 75%%, "
                   "66%% or 50%% of them (4,846) (default: all)")
    p.add_argument("--sentiment-url", default=SENTIMENT_URL, help="FinancialPhraseBank-v1.0.zip")
    p.add_argument("--sha256-sentiment", default=SENTIMENT_SHA256, metavar="HEX",
                   help="expected sha256 of that zip (default: the known one)")
    return p.parse_args(argv)


def report(path: Path, outcome: str) -> None:
    print(f"{path}: {'already present' if outcome == 'present' else 'downloaded'}, sha256 ok")


def main(argv: list[str] | None = None) -> int:
    """Download the files into --out; 0 on success, 2 (one line on stderr) on failure."""
    args = parse_args(argv)
    out = Path(args.out)
    jobs = [(out / SMS_NAME, args.sms_url, args.sha256_sms.lower(), SMS_MEMBER),
            (out / INSTRUCTIONS_NAME, args.instructions_url, args.sha256_instructions.lower(),
             None)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, url, sha256, member in jobs:
            report(path, install(path, url, sha256, member))
        if args.sentiment:
            path = out / SENTIMENT_NAME
            report(path, install_sentiment(path, args.sentiment_url, args.sha256_sentiment.lower(),
                                           args.sentiment_agreement))
            print(f"{path}: CC BY-NC-SA 3.0 (non-commercial); train a three-class classifier with "
                  f"gptjax finetune-cls --data {path}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write into {out}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
