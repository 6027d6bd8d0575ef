import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import preset
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.errors import GptjaxError
from gptjax.generation.decoder import Decoder, generate, generate_batch
from gptjax.generation.sampling import Sampling, sample_logits
from gptjax.generation.textgen import TextRow, generate_text

CFG = preset("tiny", vocab_size=40, context_length=16)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.PRNGKey(0))


def naive_greedy(params, prompt, n):
    """Feed the last context_length ids, take the argmax of the last position, repeat."""
    forward = jax.jit(model.apply, static_argnums=2)
    ids = list(prompt)
    for _ in range(n):
        window = jnp.array([ids[-CFG.context_length:]])
        ids.append(int(jnp.argmax(forward(params, window, CFG)[0, -1])))
    return ids[len(prompt):]


# Context 16. The last new id is never fed back, so (5, 12) stays in the cache to the end;
# (6, 12) slides at its last step, (12, 8) after a few, (30, 3) from a cut prompt.
@pytest.mark.parametrize("prompt_len,new", [(3, 4), (5, 12), (6, 12), (12, 8), (30, 3)])
def test_greedy_matches_a_naive_loop_also_past_the_context(params, prompt_len, new):
    prompt = [(7 * i + 3) % 40 for i in range(prompt_len)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 30-token prompt is cut to the context, tested below
        ids = generate(params, CFG, prompt, new, temperature=0.0)
    assert ids == naive_greedy(params, prompt, new)


def test_cached_logits_equal_uncached_with_left_padding(params):
    """Prefill + one-token steps over a left-padded batch give each row's full-forward logits."""
    rows = [[5, 9, 2, 7, 1, 3], [8, 4, 6]]
    width, cols = 8, 6  # cache columns; prompt columns (row 1 has 3 padding columns)
    pad = np.array([cols - len(r) for r in rows])
    tokens = np.zeros((2, cols), np.int32)
    for i, r in enumerate(rows):
        tokens[i, pad[i]:] = r
    valid = np.arange(width)[None, :] >= pad[:, None]
    cache = model.init_cache(CFG, 2, width, valid)
    positions = np.maximum(np.arange(cols)[None, :] - pad[:, None], 0)
    logits, cache = model.apply_cached(params, jnp.asarray(tokens), positions, cache, CFG)
    steps = [logits]
    for t, nxt in enumerate([[11, 12], [13, 14]]):
        logits, cache = model.apply_cached(params, jnp.array(nxt)[:, None],
                                           (cols + t - pad)[:, None], cache, CFG)
        steps.append(logits)
    for i, r in enumerate(rows):
        full = r + [[11, 12], [13, 14]][0][i:i + 1] + [[11, 12], [13, 14]][1][i:i + 1]
        expected = model.apply(params, jnp.array([full]), CFG)[0, len(r) - 1:]
        got = jnp.stack([s[i] for s in steps])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("new", [6, 14])  # 14: the 7-token row outgrows the context and slides
def test_a_batch_of_different_lengths_equals_each_prompt_alone(params, new):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    batch = generate_batch(params, CFG, prompts, new, Sampling(temperature=0.0))
    assert batch == [naive_greedy(params, p, new) for p in prompts]


def test_sampling_is_seeded_chunk_independent_and_respects_the_valid_vocabulary(params):
    kwargs = dict(seed=4, temperature=1.5, valid_vocab=10)
    a = generate(params, CFG, [1, 2, 3], 12, **kwargs)
    assert a == generate(params, CFG, [1, 2, 3], 12, **kwargs)
    assert a != generate(params, CFG, [1, 2, 3], 12, **{**kwargs, "seed": 5})
    assert all(0 <= i < 10 for i in a)
    decoder = Decoder(params, CFG, [[1, 2, 3]], 12, Sampling(1.5, seed=4), valid_vocab=10)
    pieces = [decoder.advance(k)[0] for k in (0, 1, 3, 100)]
    assert [len(p) for p in pieces] == [1, 1, 3, 7] and sum(pieces, []) == a


def test_rows_stop_at_end_of_text_independently(params):
    prompts = [[1, 2], [30, 31, 32]]
    sampling = Sampling(temperature=2.0, seed=7)
    free = generate_batch(params, CFG, prompts, 8, sampling)
    j = next(j for j in range(1, 8) if free[0][j] not in free[0][:j])
    eot = free[0][j]
    stopped = generate_batch(params, CFG, prompts, 8, sampling, eot_id=eot)
    assert stopped[0] == free[0][:j + 1]
    cut = free[1].index(eot) + 1 if eot in free[1] else 8
    assert stopped[1] == free[1][:cut]


def test_top_k_one_is_greedy_and_top_k_above_the_vocabulary_is_clamped(params):
    logits = jnp.array([[0.1, 3.0, 2.9, -1.0]])
    for seed in range(5):
        assert int(sample_logits(logits, jax.random.PRNGKey(seed), 1.0, 1, None, 4)[0]) == 1
    picks = {int(sample_logits(logits, jax.random.PRNGKey(s), 1.0, 2, None, 4)[0]) for s in range(40)}
    assert picks == {1, 2}
    assert generate(params, CFG, [1], 5, top_k=10_000, seed=1) == generate(params, CFG, [1], 5, seed=1)


def test_a_traced_top_k_below_its_cap_draws_the_same_ids_as_the_static_one():
    """k = 2 compiled for 4 candidates: the same two ids, never the tied or lower ones."""
    logits = jnp.array([[0.1, 3.0, 2.9, 2.9, -1.0, 2.9]])
    keys = jax.random.split(jax.random.PRNGKey(0), 200)

    def draws(k, cap):  # a traced k enters through jit; a static one is closed over
        if cap is None:
            one = jax.vmap(lambda key: sample_logits(logits, key, 1.0, k, None, 6)[0])
            return set(np.asarray(jax.jit(one)(keys)).tolist())
        one = jax.vmap(lambda key, k: sample_logits(logits, key, 1.0, k, None, 6, cap=cap)[0],
                       in_axes=(0, None))
        return set(np.asarray(jax.jit(one)(keys, k)).tolist())

    assert draws(jnp.int32(2), 4) == draws(2, None) == {1, 2}  # the lower id wins the tie
    assert draws(jnp.int32(1), 4) == {1}
    assert draws(jnp.int32(4), 4) == {1, 2, 3, 5}


def test_generate_samples_exactly_the_top_k_ids_through_the_decode_loop(params):
    """k = 3 runs under a cap of 4: 64 rows of one prompt, hot enough that any id could come
    up, draw their first id from exactly the three likeliest."""
    prompt = [1, 2, 3]
    last = np.asarray(model.apply(params, jnp.array([prompt]), CFG)[0, -1])
    top3 = set(np.argsort(-last)[:3].tolist())
    for prefill_only in (True, False):  # the prefill's draw, then the loop's
        rows = generate_batch(params, CFG, [prompt] * 64, 1 if prefill_only else 2,
                              Sampling(temperature=5.0, top_k=3, seed=11))
        if prefill_only:
            assert {r[0] for r in rows} == top3
        else:  # the loop's step: each row's own next logits, after its first id
            nxt = np.asarray(model.apply(params, jnp.array([prompt + r[:1] for r in rows]), CFG)[:, -1])
            for r, row_logits in zip(rows, nxt, strict=True):
                assert r[1] in set(np.argsort(-row_logits)[:3].tolist())


def test_top_k_values_below_one_power_of_two_share_one_compile():
    from gptjax.generation.decoder import _advance, _start
    params = model.init(CFG, jax.random.PRNGKey(3))

    def compiles(k):
        before = (_start._cache_size(), _advance._cache_size())
        ids = generate(params, CFG, [1, 2], 6, temperature=1.0, top_k=k, seed=k)
        assert len(ids) == 6
        return (_start._cache_size() - before[0], _advance._cache_size() - before[1])

    compiles(5)
    assert [compiles(k) for k in (6, 7, 8)] == [(0, 0)] * 3
    assert compiles(9) == (1, 1)


@pytest.mark.parametrize("top_p,allowed", [(0.01, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}),
                                           (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, allowed):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, None, jnp.float32(top_p), 4)[0])(
        jax.random.split(jax.random.PRNGKey(0), 400))
    assert set(np.asarray(draws).tolist()) == allowed
    with_k = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 3, jnp.float32(top_p), 4)[0])(
        jax.random.split(jax.random.PRNGKey(1), 400))
    assert set(np.asarray(with_k).tolist()) == allowed - {3}
    traced_k = jax.jit(jax.vmap(lambda key, k: sample_logits(logits, key, 1.0, k, jnp.float32(top_p),
                                                              4, cap=4)[0], in_axes=(0, None)))
    draws = traced_k(jax.random.split(jax.random.PRNGKey(2), 400), jnp.int32(3))
    assert set(np.asarray(draws).tolist()) == allowed - {3}  # masked candidates stay out


def test_empty_prompt_starts_from_end_of_text(params):
    assert generate(params, CFG, [], 4, temperature=0.0, eot_id=39) == naive_greedy(params, [39], 4)
    with pytest.raises(GptjaxError, match="empty prompt"):
        generate(params, CFG, [], 4)


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning(params):
    prompt = list(range(1, 21))
    with pytest.warns(UserWarning, match="keeping its last 16"):
        ids = generate(params, CFG, prompt, 3, temperature=0.0)
    assert ids == naive_greedy(params, prompt[-16:], 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2**32), "seed"), (dict(seed=-1), "seed"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
])
def test_bad_sampling_settings(params, kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    n = args.pop("max_new_tokens")
    with pytest.raises(GptjaxError, match=match):
        generate(params, CFG, [1], n, **args)


def test_prompt_ids_outside_the_vocabulary(params):
    with pytest.raises(GptjaxError, match="outside the vocabulary"):
        generate(params, CFG, [1, 45], 2)
    with pytest.raises(GptjaxError, match="outside the vocabulary"):
        generate(params, CFG, [1, 12], 2, valid_vocab=10)
    assert generate(params, CFG, [1], 0) == []


def test_text_streams_and_stops_at_stop_strings():
    tok = ByteTokenizer()
    cfg = preset("tiny", vocab_size=tok.vocab_size, context_length=64)
    p = model.init(cfg, jax.random.PRNGKey(2))
    sampling = Sampling(temperature=1.0, seed=3)
    full = generate_text(p, cfg, tok, ["hi", "abc"], 24, sampling, stop_at_eot=False)
    pieces = {0: "", 1: ""}

    def collect(row, piece):
        pieces[row] += piece

    streamed = generate_text(p, cfg, tok, ["hi", "abc"], 24, sampling, on_text=collect,
                             stop_at_eot=False)
    assert streamed == full and [pieces[0], pieces[1]] == full
    stop = full[0][6:8]
    cut = generate_text(p, cfg, tok, ["hi", "abc"], 24, sampling, stop=[stop], stop_at_eot=False)
    assert cut[0] == full[0][:full[0].index(stop)]
    assert cut[1] == (full[1][:full[1].index(stop)] if stop in full[1] else full[1])
    # Prompts already encoded (as `respond` passes them) continue exactly as their text does.
    assert generate_text(p, cfg, tok, [tok.encode("hi"), tuple(tok.encode("abc"))], 24, sampling,
                         stop_at_eot=False) == full


def test_numpy_scalars_are_accepted_as_sampling_settings(params):
    a = generate(params, CFG, [1, 2], 4, temperature=np.float32(0.7), top_p=np.float64(0.9),
                 top_k=np.int64(5), seed=np.int32(3))
    assert a == generate(params, CFG, [1, 2], 4, temperature=0.7, top_p=0.9, top_k=5, seed=3)


def test_streaming_never_shows_the_start_of_a_multibyte_stop_string():
    """The stop string's last character arrives byte by byte after its first one."""
    tok = ByteTokenizer()
    row = TextRow(["答："])
    shown = ""
    for b in "问答：x".encode():
        row.extend([b], tok.decode)
        shown += row.unshown(final=row.stopped)
    assert row.stopped and row.text == "问" and shown == "问"


def test_bfloat16_weights_decode_like_the_bfloat16_full_forward(params):
    bf_params, bf_cfg = model.cast(params, CFG, "bfloat16")
    assert bf_params["wte"]["embedding"].dtype == jnp.bfloat16
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    full = model.apply(bf_params, tokens, bf_cfg)
    np.testing.assert_allclose(full, model.apply(params, tokens, CFG), atol=0.1)
    cache = model.init_cache(bf_cfg, 1, 8)
    cached, _ = model.apply_cached(bf_params, tokens, jnp.arange(6)[None], cache, bf_cfg)
    np.testing.assert_allclose(cached, full[:, -1], atol=0.02)
    assert len(generate(bf_params, bf_cfg, [1, 2], 5, temperature=0.0)) == 5


def test_prompt_lengths_in_one_bucket_share_one_compile():
    """Prompts are padded to power-of-two buckets: lengths 9-16 reuse the prefill and the
    decode loop compiled for the first of them; 17 needs the next bucket."""
    from gptjax.generation.decoder import _advance, _start
    cfg = preset("tiny", vocab_size=40, context_length=64)
    params = model.init(cfg, jax.random.PRNGKey(1))

    def compiles(prompt_len):
        before = (_start._cache_size(), _advance._cache_size())
        generate(params, cfg, list(range(prompt_len)), 5, temperature=0.0)
        return (_start._cache_size() - before[0], _advance._cache_size() - before[1])

    compiles(9)
    assert [compiles(n) for n in (10, 13, 16)] == [(0, 0)] * 3
    assert compiles(17) == (1, 1)


@pytest.mark.parametrize("matmul", ["auto", "native", "xla"])
def test_the_batch_1_prefill_reads_the_embedding_table_in_place(matmul):
    """The one-row head is an output-major product: `wte.attend` there made XLA copy the
    whole (d_model, vocab) table transposed in every prefill (11 ms for GPT-2 124M)."""
    import re

    from gptjax.generation.decoder import _start
    cfg = preset("tiny", vocab_size=96, context_length=16, decode_matmul=matmul)
    params = model.decode_params(model.init(cfg, jax.random.PRNGKey(0)))
    decoder = Decoder(params, cfg, [[1, 2, 3]], 4, Sampling(temperature=0.0))
    tokens = jnp.zeros((1, decoder._static.cache_len), jnp.int32)
    compiled = _start.lower(params, tokens, decoder._pad, jax.random.PRNGKey(0),
                            *decoder._dynamic, s=decoder._static).compile().as_text()
    assert not re.search(rf"f32\[{cfg.d_model},{cfg.vocab_size}\]", compiled)
