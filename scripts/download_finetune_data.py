#!/usr/bin/env python3
"""Download the fine-tuning data sets: SMS Spam Collection (classification) and instruction data.

    python scripts/download_finetune_data.py --out data/

Writes sms_spam.tsv (the `SMSSpamCollection` member of the UCI zip) and
instruction-data.json into --out, each checked against a known sha256. Every file is
written under a temporary name in the target folder and renamed only once verified,
so an interrupted or failed run leaves nothing half-written. Files already present
with the right hash are skipped. Only the standard library is used, so this runs
before gptjax is installed. Failures print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
TIMEOUT_S = 60.0
MAX_BYTES = 64 << 20  # both files are well under 1 MB; a runaway reply is refused


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Download the SMS spam and instruction data sets "
                                            "used for fine-tuning, verified by sha256.")
    p.add_argument("--out", default="data", help="folder to write into (default: data)")
    p.add_argument("--sms-url", default=SMS_URL, help="zip archive holding SMSSpamCollection")
    p.add_argument("--instructions-url", default=INSTRUCTIONS_URL, help="instruction-data.json")
    p.add_argument("--sha256-sms", default=SMS_SHA256, metavar="HEX",
                   help="expected sha256 of the extracted sms_spam.tsv (default: the known one)")
    p.add_argument("--sha256-instructions", default=INSTRUCTIONS_SHA256, metavar="HEX",
                   help="expected sha256 of instruction-data.json (default: the known one)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Download both files into --out; 0 on success, 2 (one line on stderr) on failure."""
    args = parse_args(argv)
    out = Path(args.out)
    jobs = [(out / SMS_NAME, args.sms_url, args.sha256_sms.lower(), SMS_MEMBER),
            (out / INSTRUCTIONS_NAME, args.instructions_url, args.sha256_instructions.lower(),
             None)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, url, sha256, member in jobs:
            outcome = install(path, url, sha256, member)
            print(f"{path}: {'already present' if outcome == 'present' else 'downloaded'}, "
                  f"sha256 ok")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write into {out}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
