"""gptjax's native CPU kernels, called through XLA's FFI:

- skinny_matmul.cc: few-row matrix products for decoding. A decode step is a chain of
  (rows, in) x (in, out) products with one to a few rows, so its speed is how fast the
  weights are read. XLA:CPU reads float32 weights that way at ~20-25 GB/s and has no fast
  bfloat16 product (benchmarks/NOTES.md), which left bfloat16 weights no faster than
  float32. The kernel reads output-major weight rows three at a time against up to eight
  input rows held in registers, widening bfloat16 as it goes.
- causal_attention.cc: float32 causal self-attention for training, forward and backward
  (gptjax.model.attention's "native" formulation). XLA:CPU ran attention's small per-head
  products on one thread at 40-80 GFLOP/s with the softmax in separate passes; the kernel
  shares the (batch, head) pairs out over XLA's pool (tasks.h) and fuses the rest.

Both are compiled on first use, into one library, with the machine's C++ compiler (`$CXX`,
else `c++` or `g++`) against jaxlib's XLA FFI headers, for this CPU (-march=native), and
cached in `$GPTJAX_CACHE_DIR/native` (default `$XDG_CACHE_HOME/gptjax`, else
`~/.cache/gptjax`), keyed by the sources, flags, compiler, jaxlib and CPU. Off x86 or
without AVX-512 they are not used; where the build fails `available()` is False with one
warning saying why. Either way the model keeps XLA's products: the kernels only ever
speed up, never gate, a working path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(Path(__file__).with_name(n) for n in ("skinny_matmul.cc", "causal_attention.cc"))
HEADERS = (Path(__file__).with_name("tasks.h"),)  # included by the sources
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
TARGETS = {jnp.dtype(jnp.float32): "gptjax_skinny_matmul_f32",
           jnp.dtype(jnp.bfloat16): "gptjax_skinny_matmul_bf16"}
ATTENTION_TARGETS = ("gptjax_causal_attention_fwd", "gptjax_causal_attention_bwd")
INT8_TARGET = "gptjax_skinny_matmul_i8"
_SYMBOLS = {"gptjax_skinny_matmul_f32": "GptjaxSkinnyMatmulF32",
            "gptjax_skinny_matmul_bf16": "GptjaxSkinnyMatmulBF16",
            INT8_TARGET: "GptjaxSkinnyMatmulI8",
            "gptjax_causal_attention_fwd": "GptjaxCausalAttentionForward",
            "gptjax_causal_attention_bwd": "GptjaxCausalAttentionBackward"}


def cache_dir() -> Path:
    root = os.environ.get("GPTJAX_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptjax"
    return Path(root) / "native"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on their like."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _build(compiler: list[str]) -> Path:
    """Compile the kernels into the cache (once per key) and return the library's path."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True,
                             check=True).stdout
    parts = [*(src.read_text() for src in SOURCES + HEADERS), " ".join(FLAGS), version,
             metadata.version("jaxlib"), _cpu_identity()]
    key = hashlib.sha256("\0".join(parts).encode())
    library = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses (test workers, hosts
    # sharing a home) each finish a whole file, and a reader never sees half of one.
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=library.parent)
    os.close(fd)
    try:
        command = [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES),
                   "-o", partial]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            first = next((ln for ln in lines if "error:" in ln), lines[0])  # g++/clang
            raise RuntimeError(f"{' '.join(compiler)} failed: {first}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def _compiler() -> list[str] | None:
    """The C++ compiler command: $CXX (which may carry a launcher or flags), else c++/g++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("c++") or shutil.which("g++")
    return [found] if found else None


def cpu_has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def available() -> bool:
    """Whether the kernels are built and registered with XLA (decided once per process).

    False, silently, off x86 or without AVX-512 (where they would be slower than XLA);
    False with one warning when the build fails."""
    return library_path() is not None


@functools.cache
def library_path() -> Path | None:
    """The kernels' library, built, loaded and registered with XLA; None where they are not
    `available()`. What is measured on this machine with these kernels is kept beside it."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not cpu_has_avx512():
        return None
    try:
        compiler = _compiler()
        if not compiler:
            raise RuntimeError("no C++ compiler found (set CXX)")
        path = _build(compiler)
        lib = ctypes.cdll.LoadLibrary(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError,
            metadata.PackageNotFoundError) as err:
        warnings.warn(f"gptjax's CPU kernels are unavailable, decoding and attention use "
                      f"XLA's products: {err}", RuntimeWarning, stacklevel=3)
        return None
    # Both sources are compiled by one command with one set of flags: one check covers both.
    if not lib.gptjax_skinny_matmul_vectorized():
        return None  # the compiler did not enable AVX-512 after all
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return path


def skinny_matmul(x_ri: jax.Array, w_oi: jax.Array) -> jax.Array:
    """x (rows, in) times output-major w (out, in), as float32 (rows, out). CPU only;
    w float32 or bfloat16. A RuntimeError where the kernels are not `available()`."""
    _require("decode")
    target = TARGETS[jnp.dtype(w_oi.dtype)]
    out = jax.ShapeDtypeStruct((x_ri.shape[0], w_oi.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x_ri.astype(jnp.float32), w_oi)


def skinny_matmul_int8(x_ri: jax.Array, q_oi: jax.Array, scale_o: jax.Array) -> jax.Array:
    """x (rows, in) times int8 output-major q (out, in) with a float32 scale per output:
    weight-only int8, widened in registers, so a decode step reads a quarter of float32's
    bytes. CPU only; a RuntimeError where the kernels are not `available()`."""
    _require("decode")
    out = jax.ShapeDtypeStruct((x_ri.shape[0], q_oi.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(INT8_TARGET, out)(x_ri.astype(jnp.float32), q_oi,
                                              scale_o.astype(jnp.float32))


def _require(kernel: str) -> None:
    if not available():
        raise RuntimeError(f"gptjax's CPU {kernel} kernel is not available on this machine "
                           "(see gptjax.cpu.native.available)")


def _scale(head_dim: int) -> np.float32:
    return np.float32(1 / math.sqrt(head_dim))


def attention_forward(qkv):
    """Causal attention of float32 q, k, v packed as (batch, time, 3, heads, head_dim): the
    output (batch, time, heads, head_dim) and the row statistics (batch, time, heads, 2)
    that `attention_backward` takes."""
    _require("attention")
    b, t, _, h, d = qkv.shape
    out = (jax.ShapeDtypeStruct((b, t, h, d), jnp.float32),
           jax.ShapeDtypeStruct((b, t, h, 2), jnp.float32))
    return jax.ffi.ffi_call(ATTENTION_TARGETS[0], out, vmap_method="sequential")(
        qkv, scale=_scale(d))


def attention_backward(qkv, stats, d_out):
    """The gradient of causal attention with respect to packed qkv, given the forward's
    row statistics and the output's gradient."""
    _require("attention")
    grad = jax.ShapeDtypeStruct(qkv.shape, jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGETS[1], grad, vmap_method="sequential")(
        qkv, stats, d_out, scale=_scale(qkv.shape[-1]))
