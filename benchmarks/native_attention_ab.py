"""A/B of gptjax's native CPU attention kernel: a git revision's source against the working
tree's, both loaded into this one process and timed alternately (forward + backward).

The kernel is built per process from its source, so two builds cannot otherwise be timed
side by side; across processes this machine's noise (+-10%) hides kernel changes of a few
percent. Here the revision's `gptjax/cpu/native/causal_attention.cc` is compiled with the same
flags into a second library whose handler symbols are renamed, registered under its own
FFI targets, and called on the same inputs. Printed per shape: the largest difference
between the two builds' outputs (0 for a change that keeps every floating-point operation in
the same order), median ms of both,
and the median of per-repeat ratios (revision / working tree: > 1 means the tree is faster).

    python benchmarks/native_attention_ab.py                      # HEAD vs the working tree
    python benchmarks/native_attention_ab.py --rev HEAD~3 --shapes 8:256:6:64
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.cpu import native
from gptjax.errors import GptjaxError

REPO = Path(__file__).resolve().parents[1]
FOLDER = "gptjax/cpu/native"
SOURCE = f"{FOLDER}/causal_attention.cc"
RENAMED = {"GptjaxCausalAttentionForward": "GptjaxAbForward",
           "GptjaxCausalAttentionBackward": "GptjaxAbBackward"}
_builds = itertools.count()  # FFI targets cannot be registered twice under one name


def _show(rev: str, path: str) -> str:
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"],
                           capture_output=True, text=True)
    if shown.returncode:
        raise GptjaxError(f"cannot read {path} at {rev!r}: {shown.stderr.strip()}")
    return shown.stdout


def build_revision(rev: str, workdir: Path) -> tuple[str, str]:
    """Compile `rev`'s kernel source, with the local headers it includes at that revision,
    into a library under renamed symbols; register it and return its (forward, backward)
    FFI targets."""
    source = _show(rev, SOURCE)
    (workdir / Path(SOURCE).name).write_text(source)
    for header in re.findall(r'^#include "([^"/]+)"', source, flags=re.M):
        (workdir / header).write_text(_show(rev, f"{FOLDER}/{header}"))
    library = workdir / "kernel_at_rev.so"
    command = [*native._compiler(), *native.FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{workdir}",
               *(f"-D{old}={new}" for old, new in RENAMED.items()),
               str(workdir / Path(SOURCE).name), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if built.returncode:
        raise GptjaxError(f"building {SOURCE} at {rev!r} failed: {built.stderr.strip()[:500]}")
    lib = ctypes.cdll.LoadLibrary(str(library))
    build = next(_builds)
    targets = (f"gptjax_attention_fwd_ab{build}", f"gptjax_attention_bwd_ab{build}")
    for target, symbol in zip(targets, RENAMED.values()):
        try:
            handler = getattr(lib, symbol)
        except AttributeError:
            raise GptjaxError(f"{SOURCE} at {rev!r} defines no {symbol} (renamed from "
                              "its forward/backward handler): too old for this script") from None
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return targets


def forward_backward(targets: tuple[str, str], shape: tuple[int, int, int, int]):
    """jit(qkv -> (output, d qkv)) through the given kernels, with d output = output."""
    b, t, h, d = shape
    scale = np.float32(1 / np.sqrt(d))
    out = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
           jax.ShapeDtypeStruct((b, t, h, 2), jnp.float32))

    def both(qkv):
        o, stats = jax.ffi.ffi_call(targets[0], out)(qkv, scale=scale)
        grad = jax.ffi.ffi_call(targets[1], jax.ShapeDtypeStruct(qkv.shape, jnp.float32))(
            qkv, stats, o, scale=scale)
        return o, grad
    return jax.jit(both)


def compare(shape, revision, tree, repeats: int, seconds: float) -> str:
    qkv = jax.random.normal(jax.random.PRNGKey(0), (shape[0], shape[1], 3, shape[2], shape[3]),
                            jnp.float32)
    a, b = jax.block_until_ready(revision(qkv)), jax.block_until_ready(tree(qkv))
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    start = time.perf_counter()
    tree(qkv)[1].block_until_ready()
    calls = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))
    ms = {"rev": [], "tree": []}
    for rep in range(repeats):
        order = [("rev", revision), ("tree", tree)]
        for name, fn in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for _ in range(calls):
                result = fn(qkv)
            jax.block_until_ready(result)
            ms[name].append(1000 * (time.perf_counter() - t0) / calls)
    ratios = [r / t for r, t in zip(ms["rev"], ms["tree"])]
    return (f"| {':'.join(map(str, shape))} | {diff:.2g} | {statistics.median(ms['rev']):.3f} | "
            f"{statistics.median(ms['tree']):.3f} | {statistics.median(ratios):.3f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(":"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise GptjaxError(f"bad shape {text!r}: expected BATCH:TIME:HEADS:HEAD_DIM")
    return shape


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="git revision to compare against (default HEAD)")
    ap.add_argument("--shapes", nargs="+", default=["12:64:4:32", "8:256:6:64"],
                    help="BATCH:TIME:HEADS:HEAD_DIM (default: the baby and 10M configs')")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per build")
    ap.add_argument("--seconds", type=float, default=0.2, help="length of one repeat")
    args = ap.parse_args(argv)
    shapes = [parse_shape(s) for s in args.shapes]
    if args.repeats < 1 or args.seconds <= 0:
        raise GptjaxError("--repeats must be >= 1 and --seconds > 0")
    if Path(native.__file__).resolve().parents[3] != REPO:
        raise GptjaxError(f"the imported gptjax ({Path(native.__file__).parents[2]}) is not this "
                          f"checkout's ({REPO / 'gptjax'}): install it with `pip install -e .`")
    if not native.available():
        raise GptjaxError("gptjax's native kernels are not available on this machine "
                          "(gptjax.cpu.native.available())")
    with tempfile.TemporaryDirectory() as workdir:
        rev_targets = build_revision(args.rev, Path(workdir))
    print(f"{SOURCE}: {args.rev} vs the working tree, forward + backward, median of "
          f"{args.repeats} alternating repeats; jax {jax.__version__}\n")
    print("| batch:time:heads:dim | max output difference | rev ms | tree ms | rev / tree |\n"
          "|---|---|---|---|---|")
    for shape in shapes:
        print(compare(shape, forward_backward(rev_targets, shape),
                      forward_backward(native.ATTENTION_TARGETS, shape), args.repeats, args.seconds))


if __name__ == "__main__":
    try:
        main()
    except GptjaxError as e:
        sys.exit(f"native_attention_ab: error: {e}")
