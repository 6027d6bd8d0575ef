"""gptjax's native CPU kernels (gptjax.cpu.native): the decode kernel against float64 products,
inside jit and a decode loop; the attention kernel against float64 attention and jax's
gradients, under vmap and remat, and when "auto" takes it; both kernels' fallback to XLA
when they cannot be built; benchmarks/native_attention_ab.py, which times a revision's
attention kernel beside the working tree's."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, benchmark_script

from gptjax import model
from gptjax.bench import provenance
from gptjax.config import preset
from gptjax.cpu import native, products
from gptjax.errors import GptjaxError
from gptjax.generation.decoder import generate_batch
from gptjax.generation.sampling import Sampling
from gptjax.model import attention


def _compiler_found() -> bool:
    compiler = native._compiler()  # $CXX split like a shell, else c++ or g++
    return bool(compiler and shutil.which(compiler[0]))


KERNEL_CPU = os.uname().machine == "x86_64" and native.cpu_has_avx512()
BUILDABLE = KERNEL_CPU and _compiler_found()
needs_kernel = pytest.mark.skipif(
    not BUILDABLE, reason="the kernels exist only on x86 CPUs with AVX-512 and a C++ compiler; "
    "elsewhere decoding and attention use XLA, which the rest of the suite tests")


def test_the_kernel_is_available_exactly_where_it_can_be_built():
    assert native.available() == BUILDABLE


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
# Input widths with and without a tail beyond the 16-float loop (5: the tail only); output
# counts across the 66-output work chunks, ending in a block of 3, 2 or 1 outputs; rows in
# register groups of 8, 4, 2 and 1 (13 = 8 + 4 + 1, 11 = 8 + 2 + 1).
@pytest.mark.parametrize("rows,n_out,n_in", [(1, 7, 5), (2, 130, 37), (3, 64, 784),
                                             (5, 200, 768), (1, 1, 1), (8, 200, 768),
                                             (13, 133, 770), (11, 70, 37), (3, 2, 16),
                                             (4, 9, 5)])
def test_products_equal_float64_products_of_the_same_weights(dtype, rows, n_out, n_in):
    rng = np.random.default_rng(rows * n_out + n_in)
    x = jnp.asarray(rng.standard_normal((rows, n_in), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((n_out, n_in), dtype=np.float32)).astype(dtype)
    expected = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
    got = jax.jit(native.skinny_matmul)(x, w)
    assert got.dtype == jnp.float32 and got.shape == (rows, n_out)
    # float32 accumulation over n_in terms of unit-variance products
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * np.sqrt(n_in) * 4)


@needs_kernel
@pytest.mark.parametrize("rows,n_out,n_in", [(1, 7, 5), (2, 130, 37), (8, 200, 768), (13, 133, 770),
                                             (3, 2, 16)])
def test_int8_products_equal_float64_products_of_the_dequantized_weights(rows, n_out, n_in):
    rng = np.random.default_rng(rows * n_out + n_in)
    x = jnp.asarray(rng.standard_normal((rows, n_in), dtype=np.float32))
    q = jnp.asarray(rng.integers(-127, 128, (n_out, n_in)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.001, 0.1, n_out), jnp.float32)
    expected = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(scale)[:, None]).T
    got = jax.jit(native.skinny_matmul_int8)(x, q, scale)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


def test_the_kernel_takes_up_to_the_measured_row_limits():
    """Beyond NATIVE_MAX_ROWS (8 float32 rows, 32 bfloat16) XLA's products were as fast."""
    cfg = preset("tiny", vocab_size=50, context_length=16, decode_matmul="native")
    expected = native.available() and jax.default_backend() == "cpu"
    for dtype, limit in (("float32", 8), ("bfloat16", 32)):
        w = jnp.zeros((4, 4), dtype)
        assert products.uses_native(w, 1, cfg) == expected
        assert products.uses_native(w, limit, cfg) == expected
        assert not products.uses_native(w, limit + 1, cfg)
        assert not products.uses_native(w, 1, dataclasses.replace(cfg, decode_matmul="xla"))


@needs_kernel
@pytest.mark.parametrize("kernel_wins", [True, False])
def test_auto_follows_the_measurement_for_one_float32_row_only(monkeypatch, kernel_wins):
    monkeypatch.setattr(products, "kernel_wins_one_float32_row", lambda: kernel_wins)
    cfg = preset("tiny", vocab_size=50, context_length=16)
    assert cfg.decode_matmul == "auto"
    f32, bf16 = jnp.zeros((4, 4), jnp.float32), jnp.zeros((4, 4), jnp.bfloat16)
    assert products.uses_native(f32, 1, cfg) == kernel_wins
    assert products.uses_native(f32, 2, cfg) and products.uses_native(bf16, 1, cfg)
    assert products.uses_native(f32, 1, dataclasses.replace(cfg, decode_matmul="native"))


@needs_kernel
def test_the_one_row_measurement_is_recorded_beside_the_kernels_and_agrees_with_itself():
    wins = products.kernel_wins_one_float32_row()
    entries = json.loads(native.library_path().with_suffix(".choices.json").read_text())
    entry = entries[f"one float32 row through a decode step's chain, "
                    f"{provenance.usable_cores()} threads"]
    ms = entry["median_ms"]
    assert set(ms) == {"native", "xla"} and min(ms.values()) > 0
    assert entry["choice"] == ("native" if wins else "xla")
    assert wins == (ms["native"] <= (1 + entry["prefer_within"]) * ms["xla"])


@needs_kernel
def test_the_one_row_measurement_times_two_ways_of_computing_the_same_chain():
    runs = products._one_row_candidates()
    assert set(runs) == {"native", "xla"}
    kernel, xla = (np.asarray(runs[name]()) for name in ("native", "xla"))
    assert kernel.shape == xla.shape == (1, 1)
    np.testing.assert_allclose(kernel, xla, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("recorded", ["native", "xla"])
def test_a_one_row_decode_step_takes_the_path_the_record_names(recorded):
    record = native.library_path().with_suffix(".choices.json")
    key = f"one float32 row through a decode step's chain, {provenance.usable_cores()} threads"
    products.kernel_wins_one_float32_row()  # make sure this machine's real record exists
    kept = record.read_text()
    cfg = preset("tiny", vocab_size=50, context_length=16)
    params = model.decode_params(model.init(cfg, jax.random.PRNGKey(1)))
    tokens = jnp.ones((1, 1), jnp.int32)
    cache = model.init_cache(cfg, 1, 8, np.ones((1, 8), bool))
    try:
        record.write_text(json.dumps({**json.loads(kept), key: {
            "choice": recorded, "median_ms": {"native": 1.0, "xla": 1.0}}}))
        products.kernel_wins_one_float32_row.cache_clear()
        step = jax.jit(lambda p, t, c: model.apply_cached(p, t, jnp.zeros_like(t), c, cfg))
        lowered = step.lower(params, tokens, cache).as_text()
        assert ("gptjax_skinny_matmul" in lowered) == (recorded == "native")
    finally:
        record.write_text(kept)
        products.kernel_wins_one_float32_row.cache_clear()


@needs_kernel
def test_in_a_loop_the_weights_are_read_each_step():
    """Inside lax.fori_loop (how decoding calls it) every step's product is right."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((96, 96), dtype=np.float32) / 10).astype(jnp.bfloat16)

    def steps(x, multiply):
        return jax.lax.fori_loop(0, 5, lambda _, h: jnp.tanh(multiply(h, w)), x)

    x = jnp.asarray(rng.standard_normal((1, 96), dtype=np.float32))
    ours = jax.jit(lambda x: steps(x, native.skinny_matmul))(x)
    xla = jax.jit(lambda x: steps(x, lambda h, w: h @ w.astype(jnp.float32).T))(x)
    np.testing.assert_allclose(ours, xla, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype,rows", [("float32", 1), ("float32", 2), ("float32", 3),
                                        ("bfloat16", 3)])
def test_decoding_with_the_kernel_equals_decoding_with_xla(dtype, rows):
    cfg = preset("tiny", vocab_size=50, context_length=16)
    params, cfg = model.cast(model.init(cfg, jax.random.PRNGKey(1)), cfg, dtype)
    params = model.decode_params(params)
    prompts = [[1, 2, 3], [4, 5], [6]][:rows]
    ids = {m: generate_batch(params, dataclasses.replace(cfg, decode_matmul=m), prompts, 10,
                             Sampling(temperature=0.0)) for m in ("native", "xla")}
    assert ids["native"] == ids["xla"]
    cache = model.init_cache(cfg, rows, 8, np.ones((rows, 8), bool))
    tokens = jnp.ones((rows, 1), jnp.int32)
    logits = {m: model.apply_cached(params, tokens, jnp.zeros((rows, 1), jnp.int32), cache,
                                    dataclasses.replace(cfg, decode_matmul=m))[0]
              for m in ("native", "xla")}
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # bfloat16 activations round differently
    np.testing.assert_allclose(logits["native"], logits["xla"], atol=tolerance)
    for m, expected in (("native", True), ("xla", False)):  # native really took the kernel
        step = jax.jit(lambda p, t, c, m=m: model.apply_cached(
            p, t, jnp.zeros_like(t), c, dataclasses.replace(cfg, decode_matmul=m)))
        assert ("gptjax_skinny_matmul" in step.lower(params, tokens, cache).as_text()) == expected


def test_a_failing_build_falls_back_to_xla_with_one_warning_and_leaves_nothing(tmp_path):
    fake = tmp_path / "fake-c++"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                    'echo "In file included from x.h" >&2\n'
                    'echo "skinny_matmul.cc:1:1: error: this compiler always fails" >&2\nexit 1\n')
    fake.chmod(0o755)
    script = (
        "import warnings, jax\n"
        "from gptjax import model\n"
        "from gptjax.cpu import native\n"
        "from gptjax.config import preset\n"
        "from gptjax.generation.decoder import generate\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    cfg = preset('tiny', vocab_size=20, context_length=8)\n"
        "    ids = generate(model.init(cfg, jax.random.PRNGKey(0)), cfg, [1, 2], 4,"
        " temperature=0.0)\n"
        "    again = native.available()\n"
        "    from gptjax.model.attention import causal_attention\n"
        "    q = jax.numpy.ones((1, 5, 2, 4))\n"
        "    assert causal_attention(q, q, q, 'auto').shape == q.shape  # XLA's, not the kernel\n"
        "print(len(ids), again, [str(w.message) for w in caught if 'kernel' in str(w.message)])\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "CXX": str(fake), "GPTJAX_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, again, messages = done.stdout.strip().split(" ", 2)
    assert (count, again) == ("4", "False")
    if KERNEL_CPU:  # elsewhere the kernel is not even tried
        assert messages.count("decoding and attention use XLA's products") == 1, messages
        assert "error: this compiler always fails" in messages  # the error line, not the first
        assert list((cache / "native").iterdir()) == []  # no partial library left behind


@needs_kernel
def test_the_kernel_refuses_mismatched_shapes_instead_of_reading_past_them():
    assert native.available()
    x, w = jnp.ones((2, 8)), jnp.ones((5, 8))
    for out_shape in ((2, 6), (3, 5)):
        call = jax.ffi.ffi_call(native.TARGETS[w.dtype], jax.ShapeDtypeStruct(out_shape, jnp.float32))
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"expected x \(rows, in\), w \(out, in\), y \(rows, out\)"):
            jax.block_until_ready(jax.jit(call)(x, w))


# --- the causal attention kernel (gptjax/native/causal_attention.cc) ---

def _attention_inputs(b, t, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, t, h, d), dtype=np.float32))
                 for _ in range(4))


def _float64_attention(q, k, v):
    q, k, v = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    t = s.shape[-1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3)


def _value_and_grads(impl, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(w * attention.causal_attention(q, k, v, impl))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@needs_kernel
# Sequence lengths across the kernel's 8-row and 32-column register tiles (1, 7, 37, 100,
# 130: partial ones); head dims with a partial 16-float vector (8, 24, 47) and a partial
# 32-column tile (24, 47, 80).
@pytest.mark.parametrize("b,t,h,d", [(2, 1, 3, 16), (1, 7, 2, 8), (2, 37, 3, 24),
                                     (3, 64, 4, 32), (2, 100, 2, 64), (1, 130, 1, 80),
                                     (2, 45, 2, 47)])
def test_attention_kernel_equals_float64_attention_and_jax_gradients(b, t, h, d):
    q, k, v, w = _attention_inputs(b, t, h, d, seed=t * d)
    out = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "native"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _float64_attention(q, k, v), rtol=0, atol=2e-6)
    (loss, grads), (xla_loss, xla_grads) = (_value_and_grads(impl, q, k, v, w)
                                             for impl in ("native", "xla"))
    np.testing.assert_allclose(loss, xla_loss, rtol=1e-5)
    for ours, theirs in zip(grads, xla_grads):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@needs_kernel
def test_attention_kernel_never_lets_a_query_see_later_keys():
    q, k, v, _ = _attention_inputs(2, 45, 2, 16)
    changed = k.at[:, -1].set(50.0)  # only the last key differs
    run = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "native"))
    a, b = run(q, k, v), run(q, changed, v)
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


@needs_kernel
def test_auto_takes_the_attention_kernel_for_float32_on_one_cpu_device_only():
    q, k, v, _ = _attention_inputs(1, 16, 2, 8)
    lowered = lambda *xs: jax.jit(attention.causal_attention).lower(*xs).as_text()
    assert attention.native_unusable(q) is None
    assert native.ATTENTION_TARGETS[0] in lowered(q, k, v)
    half = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    assert "float32" in attention.native_unusable(half[0])
    assert native.ATTENTION_TARGETS[0] not in lowered(*half)
    with pytest.raises(GptjaxError, match="attention_impl=native cannot run here: it takes "
                                          "float32 inputs, not bfloat16"):
        attention.causal_attention(*half, "native")
    too_long = jax.ShapeDtypeStruct((1, attention.NATIVE_MAX_TIME + 1, 2, 8), jnp.float32)
    assert "up to 2048 positions, not 2049" in attention.native_unusable(too_long)
    assert attention.native_unusable(too_long.update(shape=(1, 2048, 2, 8))) is None


@needs_kernel
def test_auto_leaves_the_attention_kernel_alone_when_the_process_sees_several_devices():
    script = (
        "import jax\n"
        "from gptjax.model import attention\n"
        "q = jax.numpy.ones((2, 8, 2, 4))\n"
        "print(attention.native_unusable(q))\n"
        "text = jax.jit(attention.causal_attention).lower(q, q, q).as_text()\n"
        "print('gptjax_causal_attention' in text)\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["it is used only in a process that sees one device",
                                        "False"]


@needs_kernel
def test_attention_kernel_under_vmap_and_remat_matches_blocked():
    rng = np.random.default_rng(5)
    q, k, v, w = (jnp.asarray(rng.standard_normal((3, 2, 20, 2, 8), dtype=np.float32))
                  for _ in range(4))  # a vmapped axis of 3 over (batch, time, heads, dim)

    def loss(impl):
        per = jax.checkpoint(lambda q, k, v: attention.causal_attention(q, k, v, impl))
        return lambda q, k, v: jnp.sum(jax.vmap(per)(q, k, v) * w)
    ours, theirs = (jax.jit(jax.grad(loss(i), argnums=(0, 1, 2)))(q, k, v)
                    for i in ("native", "blocked"))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@needs_kernel
def test_the_attention_kernel_refuses_mismatched_shapes():
    assert native.available()
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    packed, out = jnp.ones((1, 4, 3, 2, 8)), f32(1, 4, 2, 8)
    stats_message = r"expected \(batch, time, heads, 2\) row statistics"
    for qkv, results, message in [
            (packed, (out, f32(1, 4, 3, 2)), stats_message),
            (packed, (out, f32(1, 4, 2, 1)), stats_message),
            (packed, (f32(1, 4, 2, 9), f32(1, 4, 2, 2)), "expected .* to match qkv"),
            (jnp.ones((1, 4, 2, 2, 8)), (out, f32(1, 4, 2, 2)), r"expected qkv packed as")]:
        call = jax.ffi.ffi_call(native.ATTENTION_TARGETS[0], results)
        with pytest.raises(jax.errors.JaxRuntimeError, match=message):
            jax.block_until_ready(jax.jit(lambda x: call(x, scale=np.float32(1)))(qkv))
    backward = jax.ffi.ffi_call(native.ATTENTION_TARGETS[1], f32(1, 4, 3, 2, 7))
    with pytest.raises(jax.errors.JaxRuntimeError, match="expected equal packed"):
        jax.block_until_ready(jax.jit(lambda x, s, d: backward(x, s, d, scale=np.float32(1)))(
            packed, jnp.ones((1, 4, 2, 2)), jnp.ones((1, 4, 2, 8))))


GIT_CHECKOUT = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True).returncode == 0


@needs_kernel
@pytest.mark.skipif(not GIT_CHECKOUT, reason="compares against a git revision: needs a checkout")
def test_the_kernel_ab_builds_a_revision_beside_the_tree_and_times_both(capsys):
    ab = benchmark_script("native_attention_ab")

    def run_once():
        ab.main(["--shapes", "2:16:2:8", "--repeats", "2", "--seconds", "0.001"])
        row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 2:16:2:8 |"))
        diff, rev_ms, tree_ms = (float(x) for x in row.split("|")[2:5])
        assert rev_ms > 0 and tree_ms > 0
        return diff

    diff = run_once()
    unchanged = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--",
                                "gptjax/cpu/native"]).returncode == 0
    # The same source built twice computes the same numbers; a kernel change being measured
    # may reorder float32 sums (values here are O(1)), never more.
    assert diff == 0.0 if unchanged else diff < 1e-4
    assert run_once() == diff  # a second build registers its own targets
    with pytest.raises(GptjaxError, match="cannot read .* at 'no-such-revision'"):
        ab.main(["--rev", "no-such-revision"])
    with pytest.raises(GptjaxError, match="bad shape"):
        ab.main(["--shapes", "2:16:2"])


@needs_kernel
def test_the_decode_products_benchmark_times_both_sides_on_the_same_products(capsys):
    script = benchmark_script("decode_products")
    assert script.main(["--layers", "1", "--rows", "2", "--repeats", "1", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    differ = float(out.split("differ by at most ")[1].split()[0])
    assert differ < 1e-4  # float32 sums in another order, O(1) values
    rows = {ln.split("|")[1].strip(): float(ln.split("|")[2].split()[0])
            for ln in out.splitlines() if ln.startswith(("| native", "| xla"))}
    assert set(rows) == {"native", "xla"} and min(rows.values()) > 0
