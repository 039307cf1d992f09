"""jax_mxfp4_moe.nnx.MoE: equals ``moe`` with its router, trains router and
biases, scans over stacked layers, loads gpt-oss, runs on an 8-device EP mesh."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx", reason="the NNX module needs the [flax] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jax_mxfp4_moe as mm  # noqa: E402
from jax_mxfp4_moe.nnx import MoE, MXFP4Experts, RoutingBias  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, K, H, I = 8, 2, 64, 64


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def block():
    return MoE.random(E, K, H, I, rngs=nnx.Rngs(0), activation="swiglu_oai", quant="a8w4")


def _x(T=7, dtype=jnp.bfloat16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((T, H)), dtype)


def test_gpt_oss_router_block_equals_moe_exactly(block):
    x = _x()
    logits = x.astype(jnp.float32) @ block.router_weight.get_value().T + block.router_bias.get_value()
    tw, ti = mm.topk_softmax(logits, K)
    want = mm.moe(x, block.weights, tw, ti, activation="swiglu_oai", quant="a8w4")
    np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(block, x)), np.asarray(want))
    # leading axes are tokens
    np.testing.assert_array_equal(np.asarray(block(x.reshape(1, 7, H))), np.asarray(want).reshape(1, 7, H))
    assert np.abs(np.asarray(want, np.float32)).max() > 0.1


def test_deepseek_and_custom_routers_equal_moe_exactly():
    ds = MoE.random(E, K, H, I, rngs=nnx.Rngs(2), router="deepseek-v3", num_groups=4, topk_groups=2,
                    routed_scaling_factor=2.5, gate_up="separated", bias=False,
                    router_bias=np.linspace(-0.5, 0.5, E))
    assert isinstance(ds.router_bias, RoutingBias) and ds.b1 is None
    x = _x(5)

    @jax.jit
    def want(x, w, router_weight):  # one compiled program (eager ops compile one by one)
        logits = x.astype(jnp.float32) @ router_weight.T
        tw, ti = mm.sigmoid_group_topk(logits, K, bias=jnp.linspace(-0.5, 0.5, E), num_groups=4,
                                       topk_groups=2, routed_scaling_factor=2.5)
        return mm.moe(x, w, tw, ti)

    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(run(ds, x)),
                                  np.asarray(want(x, ds.weights, ds.router_weight.get_value())))

    def first_two(x):  # a user router: experts 0 and 1, equal weights
        T = x.shape[0]
        return jnp.full((T, 2), 0.5, jnp.float32), jnp.tile(jnp.arange(2, dtype=jnp.int32), (T, 1))

    custom = MoE(ds.weights, top_k=2, router=first_two)
    np.testing.assert_array_equal(np.asarray(run(custom, x)),
                                  np.asarray(jax.jit(lambda x, w: mm.moe(x, w, *first_two(x)))(x, ds.weights)))


def test_router_and_biases_train_and_experts_stay_frozen():
    pytest.importorskip("optax", reason="the example trains with optax (a dependency of flax)")
    example = _load_example("finetune_router")
    _, student, x, target = example.make_problem(tokens=32)
    experts = {n: np.asarray(getattr(student, n).get_value()) for n in ("w1", "w1_scale", "w2", "w2_scale")}
    grads = nnx.jit(nnx.grad(example.loss_fn))(student, x, target)
    for name in ("router_weight", "router_bias", "b1", "b2"):
        assert float(jnp.linalg.norm(grads[name].get_value())) > 0, name
    assert all(isinstance(getattr(student, n), MXFP4Experts) for n in experts)
    losses = example.train(student, x, target, steps=20, log=lambda *a: None)
    assert losses[-1] < 0.5 * losses[0], losses
    for n, a in experts.items():
        np.testing.assert_array_equal(np.asarray(getattr(student, n).get_value()), a)


def test_scan_over_stacked_layers_equals_a_loop():
    L = 2

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return MoE.random(E, K, H, I, rngs=rngs, activation="swiglu_oai")

    layers = create(nnx.Rngs(0))
    assert layers.w1.get_value().shape == (L, E, 2 * I, H // 2)

    @nnx.jit
    def run(layers, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return x + layer(x)
        return body(x, layers)

    x = _x(5, jnp.float32)
    y = run(layers, x)
    graphdef, state = nnx.split(layers)
    one = nnx.jit(lambda m, x: x + m(x))
    z = x
    for i in range(L):
        z = one(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), z)
    np.testing.assert_allclose(np.asarray(y), np.asarray(z), rtol=1e-5, atol=1e-5)


def test_from_gpt_oss_is_the_published_block(tmp_path):
    from jax_mxfp4_moe.tools.synthetic_checkpoint import write_gpt_oss

    write_gpt_oss(tmp_path, num_layers=2, num_experts=E, hidden=128, intermediate=64, top_k=3, shards=2)
    blk = MoE.from_gpt_oss(str(tmp_path), 1, progress=False)
    assert blk.spec.top_k == 3 and blk.spec.activation == mm.Activation("swiglu_oai", limit=7.0)
    assert blk.weights.layout == "canonical"  # "auto" on CPU
    example = _load_example("gpt_oss_moe")
    from jax_mxfp4_moe.layer import checkpoints
    ckpt = checkpoints.Checkpoint(str(tmp_path))
    p = checkpoints.GPT_OSS_PREFIX.format(layer=1)
    names = ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias", "down_proj_blocks",
             "down_proj_scales", "down_proj_bias")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 128)), jnp.bfloat16)
    rw, rb = checkpoints.gpt_oss_router(ckpt, 1)
    want, _ = example.gpt_oss_moe_block(x, rw, rb, lambda e: {n: ckpt.read(p + n, e) for n in names},
                                        top_k=3, limit=7.0)
    got = np.asarray(blk(x), np.float64)
    want = np.asarray(want, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_sharding_annotations_follow_the_mesh_axes():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("ep", "tp"))
    blk = MoE.random(E, K, H, I, rngs=nnx.Rngs(0), mesh=mesh, expert_axis="ep", tensor_axis="tp")
    specs = nnx.get_partition_spec(nnx.state(blk))
    want = {"w1": P("ep", "tp", None), "w1_scale": P("ep", "tp", None), "w2": P("ep", None, "tp"),
            "w2_scale": P("ep", None, "tp"), "b1": P("ep", "tp"), "b2": P("ep", None),
            "router_weight": P(None, None), "router_bias": P(None)}
    for name, spec in want.items():
        assert specs[name].get_value() == spec, name
        assert blk.__getattribute__(name).get_value().sharding.spec == spec, name
    x = _x(4, jnp.float32)
    tw, ti = blk.route(x)
    np.testing.assert_allclose(np.asarray(blk(x)), np.asarray(mm.moe(x, blk.weights, tw, ti)),
                               rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    w = MoE.random(E, K, H, I, rngs=nnx.Rngs(0)).weights
    with pytest.raises(ValueError, match="top_k"):
        MoE(w, top_k=E + 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="router_weight: absent, so rngs"):
        MoE(w, top_k=2)
    with pytest.raises(ValueError, match="router: expected one of"):
        MoE(w, top_k=2, router="mixtral", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="need a mesh"):
        MoE(w, top_k=2, expert_axis="ep", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x: expected a last axis of 64"):
        MoE(w, top_k=2, rngs=nnx.Rngs(0))(jnp.ones((3, 32)))


# ------------------------------------------------------------ 8 CPU devices
BOUND_F32 = 1e-5  # only the order of the partial sums differs (tests/test_parallel.py)


@pytest.fixture(scope="module")
def mesh_results():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "nnx_parallel_checks.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("NNX_PARALLEL_JSON ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[-1].split(" ", 1)[1])


@pytest.mark.parametrize("name,shard", [("ep8", [2, 512, 32]), ("ep4xtp2", [4, 256, 32])])
def test_on_eight_cpu_devices_equals_one_device_and_trains(mesh_results, name, shard):
    r = mesh_results[name]
    assert "error" not in r, r["error"]
    assert r["ref_norm"] > 1.0 and r["rel"] <= BOUND_F32, r
    for key, g in r["grads"].items():
        assert g["norm"] > 0 and g["rel"] <= 1e-4, (key, g)
    assert r["w1_devices"] == 8 and r["w1_shard_shapes"] == [shard]  # each device: its experts / I slice
    assert r["gate_up"] == "interleaved"
    assert r["loss_after"] < r["loss_before"]


def test_the_module_exports_as_the_readme_says(block):
    pytest.importorskip("flatbuffers", reason="jax.export serialisation needs flatbuffers")
    graphdef, state = nnx.split(block)
    leaves, treedef = jax.tree.flatten(state)
    f = jax.jit(lambda leaves, x: nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x))
    x = _x(3)
    exported = jax.export.export(f, platforms=("cpu",))(leaves, x)
    again = jax.export.deserialize(exported.serialize())
    np.testing.assert_array_equal(np.asarray(again.call(leaves, x)), np.asarray(block(x)))
