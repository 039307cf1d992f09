"""jax_mxfp4_moe.nnx.MoE on 8 virtual CPU devices, run in a subprocess.

XLA_FLAGS must be set before jax initialises, which other test modules do
first, so tests/test_nnx.py runs ``python tests/nnx_parallel_checks.py`` and
asserts on the JSON it prints: per mesh, the module's output and gradients
against the same module on one device, and where its arrays live.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from jax_mxfp4_moe.nnx import MoE  # noqa: E402

E, K, H, I, T = 16, 4, 64, 256, 24  # I/32 = 8 MX blocks: TP up to 8 divides it
MESHES = {"ep8": ((8, 1), "ep", None, "interleaved"),
          "ep4xtp2": ((4, 2), "ep", "tp", "separated")}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loss_fn(model, x):
    return jnp.mean(model(x).astype(jnp.float32) ** 2)


def check(name):
    shape, ea, ta, gate_up = MESHES[name]
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("ep", "tp"))
    single = MoE.random(E, K, H, I, rngs=nnx.Rngs(0), gate_up=gate_up, activation="swiglu_oai")
    sharded = MoE(single.weights, top_k=K, router_weight=single.router_weight.get_value(),
                  router_bias=single.router_bias.get_value(), activation="swiglu_oai",
                  mesh=mesh, expert_axis=ea, tensor_axis=ta)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((T, H)), jnp.float32)
    fwd = nnx.jit(lambda m, x: m(x))
    y1, yn = fwd(single, x), fwd(sharded, x)
    step = nnx.jit(nnx.value_and_grad(loss_fn))
    _, g1 = step(single, x)
    before, gn = step(sharded, x)
    grads = {}
    for key in ("router_weight", "router_bias", "b1", "b2"):
        a, b = gn[key].get_value(), g1[key].get_value()
        if key == "b1" and gate_up != sharded.weight_fields["gate_up"]:
            # TP re-ordered the rows separated -> interleaved: compare in one order
            a = jnp.concatenate([a[:, 0::2], a[:, 1::2]], axis=1)
        grads[key] = dict(rel=_rel(a, b), norm=float(jnp.linalg.norm(b)))
    w1 = sharded.w1.get_value()
    shards = sorted({tuple(s.data.shape) for s in w1.addressable_shards})
    # one SGD step on the mesh; the loss after it from the same compiled step
    params = nnx.state(sharded, nnx.Param)
    nnx.update(sharded, jax.tree.map(lambda p, g: p - 0.1 * g, params, gn))
    after, _ = step(sharded, x)
    return dict(rel=_rel(yn, y1), ref_norm=float(jnp.linalg.norm(y1)), grads=grads,
                w1_shard_shapes=[list(s) for s in shards], w1_devices=len(w1.addressable_shards),
                gate_up=sharded.weight_fields["gate_up"], loss_before=float(before),
                loss_after=float(after),
                strategy_devices=len(jax.devices()))


if __name__ == "__main__":
    out = {}
    for name in MESHES:
        try:
            out[name] = check(name)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out[name] = dict(error=f"{type(e).__name__}: {e}")
    print("NNX_PARALLEL_JSON " + json.dumps(out))
    sys.exit(0)
