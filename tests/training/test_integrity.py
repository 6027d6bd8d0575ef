import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import TrainConfig, preset
from gptjax.errors import CheckpointDamaged
from gptjax.training import integrity
from gptjax.training.check_run import check_run
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.step import init_state

CFG = preset("tiny", vocab_size=20)


def test_digests_name_the_first_changed_leaf():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones(4, jnp.bfloat16)}}
    recorded = integrity.digests({"params": tree})
    assert integrity.first_mismatch({"params": tree}, recorded) is None
    changed = {**tree, "b": {"c": tree["b"]["c"].at[2].set(0)}}
    assert integrity.first_mismatch({"params": changed}, recorded) == "params/b/c"
    assert integrity.first_mismatch({"params": {**tree, "d": jnp.zeros(1)}}, recorded) == "params/d"


def test_per_shard_digests_verify_on_a_whole_array():
    # A multi-process save records one digest per shard region; restored whole (one
    # device), each region is sliced out and checked.
    full = np.arange(32, dtype=np.float32).reshape(4, 8)
    recorded = {"algorithm": "sha256", "leaves": {"params/w": {
        "0:2,0:8": integrity._hash(full[:2]), "2:4,0:8": integrity._hash(full[2:])}}}
    assert integrity.first_mismatch({"params": {"w": full}}, recorded) is None
    bad = full.copy()
    bad[3, 1] += 1
    assert integrity.first_mismatch({"params": {"w": bad}}, recorded) == "params/w"


def test_check_run_lists_each_checkpoint(tmp_path):
    state = init_state(CFG, TrainConfig())
    ckpts = Checkpoints(tmp_path / "c")
    for step in (1, 2):
        ckpts.save(state._replace(step=jnp.int32(step)), {"step": step}, 1.0)
    ckpts.close()
    assert [(r.step, r.status) for r in check_run(tmp_path / "c")] == [(1, "verified"), (2, "verified")]
    for data_file in (tmp_path / "c" / "2" / "train").rglob("d/*"):  # some are superseded: all
        blob = bytearray(data_file.read_bytes())
        blob[len(blob) // 2] ^= 1
        data_file.write_bytes(bytes(blob))
    assert [(r.step, r.status) for r in check_run(tmp_path / "c")] == [(1, "verified"), (2, "damaged")]
    abstract = jax.eval_shape(lambda: init_state(CFG, TrainConfig()))
    ckpts = Checkpoints(tmp_path / "c", create=False)
    with pytest.raises(CheckpointDamaged, match="checkpoint 2 in .* is damaged"):
        ckpts.restore(abstract, 2)  # asked for by number: refused
    told = []
    state, extra = ckpts.restore(abstract, fallback=lambda e, s: told.append(s))  # latest: falls back
    ckpts.close()
    assert told == [1] and int(state.step) == 1 and extra == {"step": 1}
