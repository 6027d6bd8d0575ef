"""GPT-2 weights in the Hugging Face layout: parity with transformers, layouts, errors, memory."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gptjax import model
from gptjax.config import preset
from gptjax.errors import GptjaxError
from gptjax.generation.decoder import generate
from gptjax.hf.io import config_from_hf, config_to_hf, load_hf, save_hf
from gptjax.runs.load import load_pretrained

SMALL = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=300)


def hf_config(**overrides) -> dict:
    return {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            **SMALL, **overrides}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random transformers GPT-2 whose LayerNorms and biases are perturbed, saved to disk."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SMALL, bos_token_id=None,
                                                             eos_token_id=None)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "model"
    m.save_pretrained(path)
    return path, m


def torch_logits(m, tokens):
    import torch
    with torch.no_grad():
        return m(torch.tensor(np.asarray(tokens))).logits.numpy()


def tokens(batch=2, length=64, vocab=300, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


def published_tensors(path) -> dict:
    """The saved model's tensors under OpenAI's published names (no "transformer." prefix)."""
    return {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}


def write_model(directory, tensors: dict, config: dict):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def same_tree(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_import_matches_transformers_logits_and_greedy_continuation(hf_model):
    path, m = hf_model
    cfg, params = load_hf(path)
    assert (cfg.vocab_size, cfg.context_length, cfg.n_layer, cfg.d_model) == (300, 64, 2, 64)
    toks = tokens()
    got = np.asarray(model.apply(params, jnp.asarray(toks), cfg))
    assert np.abs(got - torch_logits(m, toks)).max() <= 1e-4
    import torch
    prompt = toks[0, :5].tolist()
    with torch.no_grad():
        ref = m.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)[0, 5:].tolist()
    assert generate(params, cfg, prompt, 12, temperature=0) == ref


def test_published_layout_without_prefix_with_mask_buffers_and_tied_head(hf_model, tmp_path):
    path, _ = hf_model
    tensors = published_tensors(path)
    for i in range(SMALL["n_layer"]):  # what OpenAI's files on the Hub carry besides weights
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    other = write_model(tmp_path / "published", tensors, json.loads((path / "config.json").read_text()))
    assert same_tree(load_hf(other)[1], load_hf(path)[1])


def test_sharded_layout(hf_model, tmp_path):
    path, _ = hf_model
    tensors = published_tensors(path)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert same_tree(load_hf(out)[1], load_hf(path)[1])


def test_bfloat16_cast_per_leaf(hf_model):
    path, _ = hf_model
    cfg, params = load_hf(path, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    f32 = load_hf(path)[1]
    assert same_tree(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32))
    with pytest.raises(GptjaxError, match="float16 is not supported"):
        load_hf(path, dtype="float16")


def test_every_mismatch_is_listed_in_one_error(hf_model, tmp_path):
    path, _ = hf_model
    tensors = published_tensors(path)
    del tensors["h.1.mlp.c_fc.bias"]
    tensors["h.2.ln_1.weight"] = np.ones(64, np.float32)
    tensors["h.0.attn.c_proj.weight"] = np.ones((64, 65), np.float32)
    tensors["wte.weight"] = np.ones((301, 64), np.float32)
    bad = write_model(tmp_path / "bad", tensors, hf_config())
    with pytest.raises(GptjaxError) as e:
        load_hf(bad)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ["missing h.1.mlp.c_fc.bias [256]", "unexpected h.2.ln_1.weight [64]",
                 "h.0.attn.c_proj.weight has shape [64, 65], expected [64, 64]",
                 "wte.weight has shape [301, 64], expected [300, 64] (config.json vocab_size is 300)"]:
        assert part in msg, msg


def test_untied_head_is_an_error(hf_model, tmp_path):
    tensors = published_tensors(hf_model[0])
    tensors["lm_head.weight"] = tensors["wte.weight"] + 1
    with pytest.raises(GptjaxError, match="lm_head.weight differs from wte.weight"):
        load_hf(write_model(tmp_path / "untied", tensors, hf_config()))


@pytest.mark.parametrize("overrides,match", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_inner": 100}, "n_inner 100"),
    ({"scale_attn_weights": False}, "scale_attn_weights must be true"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings must be true"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"n_head": 5}, "not divisible"),
    ({"vocab_size": None}, "vocab_size=None"),
])
def test_unsupported_configs_are_rejected(overrides, match):
    with pytest.raises(GptjaxError, match=match):
        config_from_hf(hf_config(**overrides))


def test_config_round_trip_and_defaults():
    cfg = config_from_hf(hf_config(n_inner=128, layer_norm_epsilon=1e-6))
    assert (cfg.mlp_ratio, cfg.layer_norm_eps, cfg.bias, cfg.dropout) == (2, 1e-6, True, 0.0)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    assert config_from_hf(hf_config()).mlp_ratio == 4  # absent n_inner and flags: GPT-2's defaults
    assert config_to_hf(cfg)["eos_token_id"] is None  # 50256 is not an id of 300
    assert config_to_hf(preset("gpt2"))["eos_token_id"] == 50256


@pytest.mark.parametrize("d,layers,heads,count", [
    (768, 12, 12, 124_439_808), (1024, 24, 16, 354_823_168),
    (1280, 36, 20, 774_030_080), (1600, 48, 25, 1_557_611_200)])
def test_published_gpt2_sizes(d, layers, heads, count):
    cfg = config_from_hf({"model_type": "gpt2", "n_embd": d, "n_layer": layers, "n_head": heads,
                          "n_positions": 1024, "n_ctx": 1024, "vocab_size": 50257,
                          "activation_function": "gelu_new"})
    assert model.param_count(cfg) == count


@pytest.fixture
def gptjax_model():
    cfg = preset("tiny", vocab_size=300, context_length=64, d_model=64, n_head=4)
    rng = np.random.default_rng(2)  # init has zero biases and unit scales: perturb everything
    return cfg, jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape, np.float32)),
                             model.init(cfg, jax.random.PRNGKey(1)))


def test_export_loads_in_transformers_and_round_trips_exactly(gptjax_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, params = gptjax_model
    written = save_hf(params, cfg, tmp_path / "out")
    assert sorted(p.name for p in written) == ["config.json", "model.safetensors"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in written}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}, modes
    m, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    toks = tokens()
    got = np.asarray(model.apply(params, jnp.asarray(toks), cfg))
    assert np.abs(got - torch_logits(m.eval(), toks)).max() <= 1e-4
    cfg2, params2 = load_hf(tmp_path / "out")
    assert dataclasses.replace(cfg2, scan_unroll=cfg.scan_unroll) == cfg
    assert same_tree(params2, params)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging dir left


def test_export_refuses_what_it_cannot_write(gptjax_model, tmp_path):
    cfg, params = gptjax_model
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(GptjaxError, match="not empty"):
        save_hf(params, cfg, tmp_path / "full")
    with pytest.raises(GptjaxError, match="model.bias false"):
        save_hf(params, preset("tiny", vocab_size=300, bias=False), tmp_path / "nobias")
    wrong = preset("tiny", vocab_size=301, context_length=64, d_model=64, n_head=4)
    with pytest.raises(GptjaxError, match=r"wte/embedding has shape \[300, 64\], expected \[301, 64\]"):
        save_hf(params, wrong, tmp_path / "wrong")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_load_pretrained_needs_the_gpt2_vocabulary(hf_model, gpt2_ranks):
    with pytest.raises(GptjaxError, match="vocab_size 300, fewer than.*50257"):
        load_pretrained(hf_model[0], gpt2_ranks)


def test_a_padded_vocabulary_export_loads_back(tmp_path, gpt2_ranks):
    """A run trained with GPT-2's vocabulary padded to 50304 exports and imports again; its
    extra rows are kept (never cropped) and never sampled."""
    from gptjax.data.tokenizer import GPT2Tokenizer
    tokenizer = GPT2Tokenizer(gpt2_ranks)
    cfg = preset("tiny", vocab_size=50304, context_length=16)
    params = model.init(cfg, jax.random.PRNGKey(0))
    # Make the padding rows by far the most likely next tokens (the final hidden state sums
    # to ~32 with this bias, so their logits are ~320): sampling must still skip them.
    params["ln_f"]["bias"] = jnp.ones_like(params["ln_f"]["bias"])
    params["wte"]["embedding"] = params["wte"]["embedding"].at[tokenizer.vocab_size:].set(10.0)
    save_hf(params, cfg, tmp_path / "padded", tokenizer=tokenizer)
    loaded = load_pretrained(tmp_path / "padded", gpt2_ranks)
    assert loaded.config.model.vocab_size == 50304
    assert same_tree(loaded.params, params)
    ids = generate(loaded.params, loaded.config.model, [1, 2, 3], 8, temperature=1.0,
                   valid_vocab=tokenizer.vocab_size, stop_at_eot=False)
    assert len(ids) == 8 and max(ids) < tokenizer.vocab_size


# The peak is the kernel's VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
# child of pytest starts with pytest's own size as its "maximum". Resetting the high-water
# mark first (clear_refs 5) makes the peak the load's alone.
MEMORY_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import jax, jax.numpy as jnp
    jnp.ones(4).block_until_ready()
    from gptjax.hf.io import load_hf

    def kib(field):
        return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = kib("VmRSS")
    cfg, params = load_hf(sys.argv[1])
    jax.block_until_ready(params)
    print(json.dumps({"growth": kib("VmHWM") - rss,
                      "bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
                      # The load path is safetensors + JAX only.
                      "heavy": sorted(m for m in sys.modules if m.split(".")[0] in
                                      ("torch", "tensorflow", "transformers"))}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_import_peak_memory_stays_below_one_and_a_half_times_the_weights(tmp_path):
    d, layers, vocab, ctx = 512, 12, 16384, 512  # 46.5M parameters: 186 MB in float32
    config = hf_config(n_embd=d, n_layer=layers, n_head=8, n_positions=ctx, vocab_size=vocab)
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(layers):
        for name, shape in [("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("ln_2.weight", (d,)),
                            ("ln_2.bias", (d,)), ("attn.c_attn.weight", (d, 3 * d)),
                            ("attn.c_attn.bias", (3 * d,)), ("attn.c_proj.weight", (d, d)),
                            ("attn.c_proj.bias", (d,)), ("mlp.c_fc.weight", (d, 4 * d)),
                            ("mlp.c_fc.bias", (4 * d,)), ("mlp.c_proj.weight", (4 * d, d)),
                            ("mlp.c_proj.bias", (d,))]:
            shapes[f"h.{i}.{name}"] = shape
    write_model(tmp_path / "big", {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}, config)
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["bytes"] == 4 * sum(int(np.prod(s)) for s in shapes.values())
    assert result["growth"] < 1.5 * result["bytes"], result
    assert result["heavy"] == []


OFFLINE_SCRIPT = textwrap.dedent("""
    import sys
    from gptjax.errors import GptjaxError
    from gptjax.hf.source import resolve_source
    for name, hide_hub in (("gpt2", False), ("gpt2", True), ("runs/nope", True)):
        if hide_hub:
            sys.modules["huggingface_hub"] = None  # as if the [hf] extra were not installed
        try:
            resolve_source(name)
        except GptjaxError as e:
            print(e)
""")


def test_hub_names_offline_give_one_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    (tmp_path / "runs").mkdir()
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True,
                         env=env, check=True, timeout=60, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out
    for line in lines[:2]:
        assert "config.json" in line and "model.safetensors" in line, line
        assert "https://huggingface.co/gpt2" in line and "pass that directory" in line, line
    assert "pip install 'gptjax[hf]'" in lines[1]
    # A name whose first part is a local directory reads as a mistyped path first.
    assert lines[2].startswith("runs/nope not found: runs/ has no nope"), lines[2]
