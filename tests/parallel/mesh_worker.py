"""Run in a subprocess with 8 simulated CPU devices (XLA_FLAGS set by the caller).

Trains the same small model for a few float32 steps from identical parameters and batches
on one device, on several meshes, and under pmap, and prints the losses and per-device
memory as JSON. Usage: python mesh_worker.py STEPS MESH [MESH ...]
"""

import json
import sys

import jax
import numpy as np

from gptjax.config import ModelConfig, TrainConfig
from gptjax.parallel.mesh import make_mesh
from gptjax.parallel.sharding import check_batch, check_divisible, make_sharded_train_step, shardings
from gptjax.training.step import init_state, make_train_step

CFG = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)
TRAIN = TrainConfig(batch_size=8, max_steps=100, warmup_steps=2, lr=3e-3)


def batches(steps: int):
    """Rows count up from a random start by a random stride: learnable, so losses move."""
    rng = np.random.default_rng(0)
    shape = (steps, TRAIN.batch_size, 1)
    start, stride = rng.integers(0, CFG.vocab_size, shape), rng.integers(1, 4, shape)
    tokens = (start + stride * np.arange(CFG.context_length + 1)) % CFG.vocab_size
    return [{"inputs": t[:, :-1].astype(np.int32), "targets": t[:, 1:].astype(np.int32)}
            for t in tokens]


def train_on(mesh, steps: int):
    check_divisible(CFG, mesh)
    check_batch(TRAIN.batch_size, mesh, TRAIN.grad_accum)
    state = init_state(CFG, TRAIN)
    step, state_sh = make_sharded_train_step(make_train_step(CFG, TRAIN), state, mesh)
    state = jax.device_put(state, state_sh)
    losses = []
    for batch in batches(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def per_device_fraction(state) -> float:
    """Largest share of the parameter + moment bytes any one device holds."""
    leaves = jax.tree.leaves((state.params, state.opt_state))
    total = sum(x.nbytes for x in leaves)
    per_device = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / total


def pmap_losses(steps: int):
    n = jax.device_count()
    state = init_state(CFG, TRAIN)
    step = jax.pmap(make_train_step(CFG, TRAIN, axis_name="data"), axis_name="data")
    state = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *x.shape)), state)
    losses = []
    for batch in batches(steps):
        shards = jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), batch)
        state, metrics = step(state, shards)
        losses.append(float(metrics["loss"][0]))
    return losses


def restore_elsewhere(state, state_sh_of) -> dict:
    """Save `state` from its mesh; restore onto 4 devices and onto 1; compare exactly."""
    import tempfile

    from gptjax.training.checkpoint import Checkpoints
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = Checkpoints(f"{tmp}/ckpt")
        ckpts.save(state, {"note": "mesh test"}, 0.0)
        ckpts.close()
        saved = jax.tree.map(np.asarray, jax.device_get(state))
        for name, mesh in [("data=2,fsdp=2 on 4", make_mesh("data=2,fsdp=2", jax.devices()[:4])),
                           ("one device", make_mesh("data=1", jax.devices()[:1]))]:
            target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  state, state_sh_of(mesh))
            reader = Checkpoints(f"{tmp}/ckpt", create=False)
            restored, _ = reader.restore(target)
            reader.close()
            same = all(np.array_equal(a, np.asarray(b)) for a, b in
                       zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))))
            placed = {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set}
            out[name] = {"identical": same, "devices": len(placed)}
    return out


def main():
    steps, specs = int(sys.argv[1]), sys.argv[2:]
    single, _ = train_on(make_mesh("data=1", jax.devices()[:1]), steps)
    out = {"devices": jax.device_count(), "single": single, "meshes": {},
           "pmap": pmap_losses(steps)}
    for spec in specs:
        losses, state = train_on(make_mesh(spec), steps)
        out["meshes"][spec] = {"losses": losses, "max_device_fraction": per_device_fraction(state)}
        if spec == "fsdp=8":
            out["restored_from_fsdp8"] = restore_elsewhere(state, lambda mesh: shardings(state, mesh))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
