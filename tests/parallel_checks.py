"""Multi-device checks of jax_mxfp4_moe.layer.parallel, run in one subprocess.

The CPU backend gets 8 virtual devices only if XLA_FLAGS is set before jax
initialises, which other test modules do first; tests/test_parallel.py runs
``python tests/parallel_checks.py`` and asserts on the JSON it prints (one
record per case in CASES). Module level is plain data so pytest can
parametrize over CASES without importing jax here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

DEVICES = 8
E, H, I = 16, 64, 256  # I/32 = 8 blocks: every TP size up to 8 divides it
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))  # (expert axis "ep", tensor axis "tp")
STRATS = ("gather_scatter", "all_to_all")


def _case(name, **kw):
    base = dict(name=name, kind="compare", mesh=(4, 2), expert_axis="ep", tensor_axis="tp",
                strategy="gather_scatter", T=13, k=4, quant="a16w4", activation="silu",
                gate_up="separated", routing="random", dtype="float32", bias=True,
                capacity_factor=None, ragged=None, backend=None)
    base.update(kw)
    return base


CASES = [
    # every mesh and strategy; each mesh also carries one variant
    # (jit compiles are the cost of this file, so variants share cases)
    *[_case(f"mesh8x1-T_lt_devices-{s}", mesh=(8, 1), strategy=s, T=3) for s in STRATS],
    # T=13: not divisible by 4, so token padding is exercised
    *[_case(f"mesh4x2-{s}", strategy=s) for s in STRATS],
    *[_case(f"mesh2x4-interleaved_swiglu-{s}", mesh=(2, 4), strategy=s,
            gate_up="interleaved", activation="swiglu_oai") for s in STRATS],
    *[_case(f"mesh1x8-no_bias-{s}", mesh=(1, 8), strategy=s, bias=False) for s in STRATS],
    # uneven routing: every token on the experts of one device
    *[_case(f"uneven_first_device-4x2-{s}", strategy=s, routing="first_device", T=16)
      for s in STRATS],
    *[_case(f"uneven_last_device-8x1-{s}", mesh=(8, 1), strategy=s, routing="last_device",
            T=16, k=2) for s in STRATS],
    *[_case(f"T0-4x2-{s}", strategy=s, T=0) for s in STRATS],
    _case("a8w4-4x2-all_to_all", strategy="all_to_all", quant="a8w4"),
    _case("a4w4-4x2-gather_scatter", quant="a4w4"),
    _case("bf16-4x2-gather_scatter", dtype="bfloat16", T=32),
    _case("ep_only-8x1-gather_scatter", mesh=(8, 1), tensor_axis=None, T=16),
    _case("tp_only-1x8", mesh=(1, 8), expert_axis=None, T=5),
    # all tokens on device 0's experts with capacity for balanced routing:
    # the overflow is dropped, counted, and equals the documented drop rule
    _case("capacity_drops-4x2", kind="capacity", strategy="all_to_all", routing="first_device",
          T=32, k=2, capacity_factor=1.0),
    _case("capacity_balanced-4x2", kind="capacity", strategy="all_to_all", routing="balanced",
          T=32, k=2, capacity_factor=1.0),
    _case("shards-4x2", kind="shards", T=16),
    _case("shards-8x1-separated", kind="shards", mesh=(8, 1), T=16),
    _case("hlo_bytes-4x2-gather_scatter", kind="hlo_bytes", T=16),
    _case("hlo_bytes-4x2-all_to_all-capacity", kind="hlo_bytes", strategy="all_to_all",
          T=64, k=2, capacity_factor=1.0),
    _case("hlo_bytes-1x8-tp_only", kind="hlo_bytes", mesh=(1, 8), expert_axis=None, T=16),
    _case("errors-4x2", kind="errors", gate_up="interleaved"),
]


# On GPUs (`parallel_checks.py --gpu`, 2 devices): the ragged all_to_all,
# which XLA:CPU does not lower, against the dense one and the single device;
# the local layer on the jnp path and on the platform's kernels.
GPU_CASES = [
    # one GPU: the lowering of every path, the kernels inside shard_map
    *[_case(f"gpu-1x1-{n}-{b}", mesh=(1, 1), strategy=s, ragged=r, backend=b, T=64,
            dtype="bfloat16")
      for n, s, r in (("gather_scatter", "gather_scatter", None),
                      ("all_to_all_ragged", "all_to_all", True))
      for b in ("jnp", "auto")],
    *[_case(f"gpu-2x1-{n}-{b}", mesh=(2, 1), strategy=s, ragged=r, backend=b, T=64,
            dtype="bfloat16")
      for n, s, r in (("gather_scatter", "gather_scatter", None),
                      ("all_to_all_ragged", "all_to_all", True),
                      ("all_to_all_dense", "all_to_all", False))
      for b in ("jnp", "auto")],
    _case("gpu-1x2-tp-auto", mesh=(1, 2), expert_axis=None, backend="auto", T=64,
          dtype="bfloat16"),
    _case("gpu-2x1-uneven-ragged", mesh=(2, 1), strategy="all_to_all", ragged=True,
          backend="jnp", routing="first_device", T=64, dtype="bfloat16"),
    _case("gpu-2x1-capacity_drops-ragged", kind="capacity", mesh=(2, 1), strategy="all_to_all",
          ragged=True, backend="jnp", routing="first_device", T=64, k=2, capacity_factor=0.5,
          dtype="bfloat16"),
]


# --------------------------------------------------------------------------
# runner (only in the subprocess)
# --------------------------------------------------------------------------

def _float_weights(np, bias):
    rng = np.random.default_rng(1234)
    w1 = rng.normal(size=(E, 2 * I, H)).astype(np.float32) * 0.2
    w2 = rng.normal(size=(E, H, I)).astype(np.float32) * 0.2
    b1 = rng.normal(size=(E, 2 * I)).astype(np.float32) * 0.1 if bias else None
    b2 = rng.normal(size=(E, H)).astype(np.float32) * 0.1 if bias else None
    return w1, w2, b1, b2


def _tokens(c, np, rng):
    T, k = c["T"], c["k"]
    x = rng.normal(size=(T, H)).astype(np.float32)
    de = c["mesh"][0] if c["expert_axis"] else 1
    e_l = E // de
    def draw(n):  # k distinct experts per token out of range(n)
        return np.array([rng.permutation(n)[:k] for _ in range(T)], np.int64).reshape(T, k)
    if c["routing"] == "random":
        ids = draw(E)
        if T > 2:  # ids outside [0, E) mean "not here"
            ids[0, 0], ids[2, k - 1] = -1, E + 5
    elif c["routing"] == "first_device":
        ids = draw(e_l)
    elif c["routing"] == "last_device":
        ids = E - e_l + draw(e_l)
    else:  # balanced: token t's slots on devices (t + j) mod De, each device equally often
        ids = np.array([[((t + j) % de) * e_l + (t // de) % e_l for j in range(k)]
                        for t in range(T)]).reshape(T, k)
    tw = rng.random(size=(T, k)).astype(np.float32)
    return x, ids.astype(np.int32), tw


def _rel(np, a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb else float(np.linalg.norm(a - b))


def _expected_drops(np, ids, c, T_l, cap):
    """ids with the pairs the documented capacity rule drops set to -1."""
    de = c["mesh"][0]
    e_l = E // de
    out = ids.copy()
    dropped = 0
    for s in range(de):
        for d in range(de):
            n = 0
            for t in range(s * T_l, min((s + 1) * T_l, ids.shape[0])):
                here = [(0 <= e < E and e // e_l == d) for e in ids[t]]
                if any(here):
                    n += 1
                    if n > cap:
                        for j, h in enumerate(here):
                            if h:
                                out[t, j] = -1
                                dropped += 1
    return out, dropped


def _hlo_bytes(text):
    """Per-device bytes sent by the collectives of a compiled HLO module."""
    import re
    from fractions import Fraction
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "u32": 4}
    total = Fraction(0)
    found = []
    for line in text.splitlines():
        m = re.search(r"=\s*(\(.*?\)|\w+\[[\d,]*\](?:\{[\d,]*\})?)\s+"
                      r"(all-gather|reduce-scatter|all-reduce|all-to-all)\(", line)
        if not m:
            continue
        nbytes = 0
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            nbytes += n * sizes[dt]
        g = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
        if g:
            s = len(g.group(1).split(","))
        else:
            g = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
            s = int(g.group(2))
        op = m.group(2)
        if op == "all-gather" or op == "all-to-all":
            b = Fraction(nbytes * (s - 1), s)
        elif op == "reduce-scatter":
            b = Fraction(nbytes * (s - 1))
        else:
            b = Fraction(2 * nbytes * (s - 1), s)
        if s > 1:
            found.append(f"{op} {m.group(1)[:60]} group={s}")
            total += b
    return float(total), found


def run_case(c, cache):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jax_mxfp4_moe
    from jax_mxfp4_moe.layer import parallel
    from jax_mxfp4_moe.layer.weights import prepare_weights

    rng = np.random.default_rng(zlib.crc32(c["name"].encode()))
    n_dev = c["mesh"][0] * c["mesh"][1]
    mesh = Mesh(np.array(jax.devices()[:n_dev]).reshape(c["mesh"]), ("ep", "tp"))
    ea, ta = c["expert_axis"], c["tensor_axis"]
    x, ids, tw = _tokens(c, np, rng)
    w1, w2, b1, b2 = _float_weights(np, c["bias"])
    # quantising and sharding compile eagerly: once per distinct key
    wkey = (c["gate_up"], c["bias"])
    if wkey not in cache:
        cache[wkey] = prepare_weights(w1, w2, b1, b2, gate_up=c["gate_up"])
    W = cache[wkey]
    dtype = jnp.dtype(c["dtype"])
    kw = dict(activation=c["activation"], quant=c["quant"])
    if c["backend"] is not None:
        kw["backend"] = c["backend"]
    out = {}

    if c["kind"] == "errors":
        msgs = {}
        def err(label, f):
            try:
                f()
                msgs[label] = None
            except ValueError as e:
                msgs[label] = str(e)
        sw_ep = parallel.shard_weights(W, mesh, expert_axis="ep")
        xj = jnp.asarray(x)
        err("sharded_ep_called_ep_tp", lambda: parallel.moe(
            xj, sw_ep, tw, ids, mesh=mesh, expert_axis="ep", tensor_axis="tp"))
        W_sep = prepare_weights(w1, w2, b1, b2, gate_up="separated")
        err("separated_called_tp", lambda: parallel.moe(
            xj, W_sep, tw, ids, mesh=mesh, expert_axis="ep", tensor_axis="tp"))
        err("sharded_ep_called_tp_ep", lambda: parallel.moe(
            xj, parallel.shard_weights(W, mesh, expert_axis="tp", tensor_axis=None), tw, ids,
            mesh=mesh, expert_axis="ep"))
        mesh3 = Mesh(np.array(jax.devices()[:6]).reshape(3, 2), ("ep", "tp"))
        err("ep3_divides_E", lambda: parallel.shard_weights(W, mesh3, expert_axis="ep"))
        err("unknown_axis", lambda: parallel.shard_weights(W, mesh, expert_axis="experts"))
        out["messages"] = msgs
        return out

    skey = wkey + (c["mesh"], ea, ta)
    if skey not in cache:
        cache[skey] = parallel.shard_weights(W, mesh, expert_axis=ea, tensor_axis=ta)
    sw = cache[skey]
    tok = NamedSharding(mesh, P(ea) if ea else P())
    T_pad_ok = ea is None or c["T"] % c["mesh"][0] == 0
    put = (lambda a: jax.device_put(a, tok)) if T_pad_ok else jnp.asarray
    xs, tws, idss = put(jnp.asarray(x, dtype)), put(tw), put(ids)
    f = jax.jit(functools.partial(parallel.moe, mesh=mesh, expert_axis=ea, tensor_axis=ta,
                                  strategy=c["strategy"], capacity_factor=c["capacity_factor"],
                                  ragged=c["ragged"], **kw))

    if c["kind"] == "shards":
        # every device holds exactly its block; blocks hold the right values
        es, ts = c["mesh"]
        W_canon = W if ts == 1 else prepare_weights(
            w1 if c["gate_up"] == "interleaved" else
            np.stack([w1[:, :I], w1[:, I:]], axis=2).reshape(E, 2 * I, H),
            w2, None if b1 is None else
            np.stack([b1[:, :I], b1[:, I:]], axis=2).reshape(E, 2 * I), b2,
            gate_up="interleaved")
        want = {"w1": (E // es, 2 * I // ts, H // 2), "w1_scale": (E // es, 2 * I // ts, H // 32),
                "w2": (E // es, H, I // 2 // ts), "w2_scale": (E // es, H, I // 32 // ts),
                "b1": (E // es, 2 * I // ts), "b2": (E // es, H)}
        res = {"gate_up": sw.gate_up}
        for name, a in sw.arrays().items():
            full = np.asarray(getattr(W_canon, name))
            shapes = {tuple(s.data.shape) for s in a.addressable_shards}
            values_ok = all(np.array_equal(np.asarray(s.data), full[s.index])
                            for s in a.addressable_shards)
            blocks = {str(s.index) for s in a.addressable_shards}
            res[name] = dict(shapes=[list(s) for s in shapes], want=list(want[name]),
                             values_ok=values_ok, distinct_blocks=len(blocks),
                             devices=len(a.addressable_shards))
        y = f(xs, sw, tws, idss)
        res["y_sharding_ok"] = y.sharding.is_equivalent_to(NamedSharding(mesh, P("ep")), 2)
        out["shards"] = res
        return out

    if c["kind"] == "hlo_bytes":
        text = f.lower(xs, sw, tws, idss).compile().as_text()
        measured, found = _hlo_bytes(text)
        de = c["mesh"][0] if ea else 1
        cb = parallel.comm_bytes(c["strategy"], devices=de, tokens=c["T"], top_k=c["k"],
                                 hidden=H, dtype_bytes=dtype.itemsize,
                                 tensor_devices=c["mesh"][1] if ta else 1,
                                 capacity_factor=c["capacity_factor"])
        out.update(hlo_sent=measured, comm_bytes=cb, collectives=found)
        return out

    if c["backend"] == "auto" and c["T"]:  # did the platform's kernels run?
        hlo = f.lower(xs, sw, tws, idss).as_text()
        out["kernels_in_hlo"] = "jax_mxfp4_moe_launch" in hlo
    single = jax.jit(functools.partial(jax_mxfp4_moe.moe, **kw))
    r = f(xs, sw, tws, idss)
    y, dropped = r if c["capacity_factor"] is not None else (r, None)
    ids_ref = ids
    if c["kind"] == "capacity":
        T_l = -(-c["T"] // c["mesh"][0])
        cap = parallel.capacity(T_l, c["k"], c["mesh"][0], c["capacity_factor"])
        ids_ref, out["expected_dropped"] = _expected_drops(np, ids, c, T_l, cap)
        out["dropped"] = int(dropped)
    ref = single(jnp.asarray(x, dtype), W, jnp.asarray(tw), jnp.asarray(ids_ref))
    out.update(shape=list(y.shape), dtype=str(y.dtype), ref_shape=list(ref.shape),
               rel=_rel(np, y, ref), ref_norm=float(np.linalg.norm(np.asarray(ref, np.float64))),
               finite=bool(np.isfinite(np.asarray(y, np.float64)).all()))
    return out


def main() -> None:
    gpu = "--gpu" in sys.argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not gpu:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={DEVICES}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import traceback

    import jax

    from jax_mxfp4_moe.layer import parallel
    want = os.environ.get("PARALLEL_CHECKS_PACKAGE")
    if want and os.path.abspath(parallel.__file__) != want:  # e.g. an editable install elsewhere
        raise SystemExit(f"the subprocess imports {parallel.__file__}, the test {want}")
    need = 1 if gpu else DEVICES
    if len(jax.devices()) < need:
        raise SystemExit(f"need {need} devices, got {jax.devices()}")
    only = {a for a in sys.argv[1:] if not a.startswith("--")}
    results, cache = {}, {}
    for c in GPU_CASES if gpu else CASES:
        if only and c["name"] not in only:
            continue
        n_dev = c["mesh"][0] * c["mesh"][1]
        if n_dev > len(jax.devices()):
            results[c["name"]] = {"skipped": f"needs {n_dev} devices, "
                                             f"{len(jax.devices())} present"}
            continue
        start = time.perf_counter()
        try:
            results[c["name"]] = run_case(c, cache)
            results[c["name"]]["seconds"] = round(time.perf_counter() - start, 2)
        except Exception:  # recorded; the test of that case fails with it
            results[c["name"]] = {"error": traceback.format_exc()}
    print("PARALLEL_CHECKS_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
