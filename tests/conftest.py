"""Shared fixtures: a small prepared corpus, the GPT-2 ranks file, and a CLI runner."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gptjax.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED_RANKS = REPO.parent / "shared" / "data" / "gpt2.tiktoken"

# The native kernels are built on first use; keep the suite's build out of the user's
# home (one directory for all test workers, so it is built once per machine).
os.environ.setdefault("GPTJAX_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"gptjax-test-cache-{os.getuid()}"))

# In-process CLI calls (run_cli) would otherwise set gptjax train's allocator policy on this
# pytest process whenever they ran before anything started JAX: off, so the suite's behaviour
# does not depend on test order. tests/cpu/test_host_memory.py turns it on where it tests it.
os.environ.setdefault("GPTJAX_KEEP_FREED_MEMORY", "0")

STORY = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
    "with a single step. She sells sea shells by the sea shore; the shells she sells are "
    "sea shells, I'm sure. Peter Piper picked a peck of pickled peppers!\n"
)


@pytest.fixture(scope="session")
def gpt2_ranks() -> str | None:
    """Local GPT-2 ranks (env or ../shared/data); None lets tiktoken download them."""
    path = os.environ.get("GPTJAX_GPT2_RANKS") or (str(SHARED_RANKS) if SHARED_RANKS.exists() else None)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "story.txt"
    path.write_text(STORY * 40)
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    """A prepared char-level dataset (~8K train tokens)."""
    out = tmp_path_factory.mktemp("prepared") / "char"
    assert main(["prepare", str(corpus_file), "--out", str(out), "--tokenizer", "char",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def faults_reference(tmp_path_factory, char_data) -> tuple[Path, list]:
    """benchmarks/faults.py's uninterrupted run: (its folder, its final state as saved), the
    run that tests/faults/ compares every interrupted or damaged run with. Made once per
    test process; tests copy the folder before changing anything in it."""
    work = tmp_path_factory.mktemp("faults-reference")
    return work / "reference", benchmark_script("faults").reference(work, char_data)


TINY_RUN = ["--preset", "tiny", "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1",
            "--eval-every", "3", "--eval-batches", "2", "--max-new-tokens", "8", "--no-progress"]


def repo_script(folder: str, name: str):
    """FOLDER/NAME.py of the repository imported as a module (benchmarks/ and scripts/ are
    not packages)."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module."""
    return repo_script("benchmarks", name)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gptjax argv...` run in-process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def fails_cleanly(capsys, *argv, match: str) -> None:
    """The command fails as bad input: exit 2 and one error line on stderr containing `match`."""
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and match in lines[0], err


_BYTE_BASES: dict[Path, Path] = {}  # corpus file -> the byte base made from it in this process


def byte_base(root: Path, corpus_file: Path) -> Path:
    """A tiny byte-level run in root/base (data in root/data) whose 184-byte context holds
    the instruction template: every text encodes, whatever its characters.

    Made once per test process (the modules that use it each get a copy of the two folders,
    so nothing one module writes is seen by another): preparing and training it again gives
    the same files, training being deterministic."""
    made = _BYTE_BASES.get(corpus_file)
    if made is None:
        made = root.parent / f"byte-base-{len(_BYTE_BASES)}"
        assert main(["prepare", str(corpus_file), "--out", str(made / "data"), "--tokenizer", "byte",
                     "--no-progress"]) == 0
        assert main(["train", "--data", str(made / "data"), "--out", str(made / "base"), *TINY_RUN,
                     "--context-length", "184", "--max-steps", "4", "--max-new-tokens", "0"]) == 0
        _BYTE_BASES[corpus_file] = made
    for folder in ("data", "base"):
        shutil.copytree(made / folder, root / folder)
    return root

