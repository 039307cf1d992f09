"""The layer's forward against its forward + backward on one GPU (issue 19's
bar: one forward plus backward <= 2.3x the forward), timed as the bench
times a layer (tools/bench.py: inside jit, pipelined calls, median of reps),
with each kernel's device time of one call of each (JAX profiler).

The backward is jax.grad of loss = sum(y * ct) for a fixed random
cotangent ct, in x, topk_weights, b1 and b2.

  python bench/grad_session.py time --preset gpt-oss-120b --tokens 4096 [--json F]
  python bench/grad_session.py warm --preset gpt-oss-120b --tokens 4096

``warm`` compiles, without a GPU, every kernel variant that ``time`` and
tests/test_cuda_grad_gpu.py launch into the code cache
($JAX_MXFP4_MOE_CACHE_DIR), with the triton that will run them.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4_moe.layer import api
from jax_mxfp4_moe.tools import bench
from warm_cache import weight_shapes  # bench/ is this script's sys.path[0]


def forward(p, quant):
    def run(w, x, tws, idss, ct):
        return [api.moe(x, w, tw, ids, activation=p.activation, quant=quant)
                for tw, ids in zip(tws, idss)]
    return jax.jit(run)


def forward_backward(p, quant):
    def run(w, x, tws, idss, ct):
        out = []
        for tw, ids in zip(tws, idss):
            def loss(x, tw, b1, b2, ids=ids):
                y = api.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids,
                            activation=p.activation, quant=quant)
                return jnp.sum(y.astype(jnp.float32) * ct)
            argnums = (0, 1) + ((2,) if w.b1 is not None else ()) + \
                ((3,) if w.b2 is not None else ())
            out.append(jax.grad(loss, argnums=argnums)(x, tw, w.b1, w.b2))
        return out
    return jax.jit(run)


def _problem(p, T, routings, layout):
    w = bench.random_weights(p, jax.random.key(42)).to_layout(layout)
    x = jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(T + 1), (T, p.hidden), jnp.float32)
    R = bench.routings_for(p, T, routings)
    ids, tw = bench.random_routings(p, T, R, seed=T)
    return w, x, tuple(jnp.asarray(a) for a in tw), tuple(jnp.asarray(a) for a in ids), ct, R


def time_layer(preset, T, quant, *, reps, routings, layout, variants, profile, hlo=None):
    p = bench.PRESETS[preset]
    w, x, tws, idss, ct, R = _problem(p, T, routings, layout)
    args = (w, x, tws, idss, ct)
    fns = {"forward": forward(p, quant).lower(*args).compile()}
    for name, install in variants.items():
        install()  # traced and compiled under this variant
        fns[name] = forward_backward(p, quant).lower(*args).compile()
        if hlo and name == "fwd_bwd":
            with open(hlo, "w") as f:
                f.write(fns[name].as_text())
    rows = {}
    for name, fn in fns.items():
        times = bench._time_pipelined(fn, *args, reps=reps, warmup=2)
        rows[name] = dict(time_s=statistics.median(times) / R,
                          spread=(min(times) / R, max(times) / R))
        if profile:
            rows[name]["profile"] = [(n, t / R, c / R) for n, t, c in bench.profile_layer(fn, *args)]
    fwd = rows["forward"]["time_s"]
    for name, r in rows.items():
        r["ratio_to_forward"] = r["time_s"] / fwd
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__, preset=preset, T=T,
                quant=quant, layout=layout, routings=R, reps=reps, rows=rows)


def _report(res, top=18):
    print(f"# {res['device']}, jax {res['jax']}: {res['preset']} {res['quant']} T={res['T']} "
          f"({res['layout']} weights), median of {res['reps']} reps, {res['routings']} routing(s)")
    for name, r in res["rows"].items():
        lo, hi = r["spread"]
        print(f"{name:>16}: {r['time_s'] * 1e6:9.1f} us  (x{r['ratio_to_forward']:.2f} of the "
              f"forward; reps {lo * 1e6:.0f}-{hi * 1e6:.0f} us)")
    for name, r in res["rows"].items():
        if "profile" in r:
            total = sum(t for _, t, _ in r["profile"])
            print(f"# {name}: kernels {total * 1e6:.1f} us in all; the longest:")
            for n, t, c in r["profile"][:top]:
                print(f"#   {t * 1e6:8.1f} us  x{c:g}  {n[:110]}")


def warm(presets, tokens, quant, layout):
    """Lower (for CUDA, no GPU needed) the forward and forward + backward of
    each preset and T, and every grouped matmul the GPU tests launch."""
    t0 = time.time()
    for preset in presets:
        p = bench.PRESETS[preset]
        w = weight_shapes(p, layout, scale_max=123)
        for T in tokens:
            sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
            args = (w, sds((T, p.hidden), jnp.bfloat16), (sds((T, p.top_k), jnp.float32),),
                    (sds((T, p.top_k), jnp.int32),), sds((T, p.hidden), jnp.float32))
            for fn in (forward(p, quant), forward_backward(p, quant)):
                fn.trace(*args).lower(lowering_platforms=("cuda",))
            print(f"{preset} T={T}: compiled ({time.time() - t0:.0f} s)", flush=True)
    sys.path.insert(0, "tests")
    import moe_cases
    import test_cuda_grad_gpu as t
    from jax_mxfp4_moe.cuda import backend as cuda
    for shape in t.GMM_SHAPES:
        for lay in ("canonical", "sm90"):
            w = moe_cases.make_weights(shape, gate_up="separated", bias=False, layout=lay)
            for which in ("w1", "w2"):
                for transpose in (False, True):
                    for bm in (16, 32, 64, 128):
                        for sm in (w.scale_max, None):
                            params = dict(moe_cases.gmm_params(w, which=which, transpose=transpose,
                                                               block_m=bm), scale_max=sm)
                            n, k = (2 * shape.I, shape.H) if which == "w1" else (shape.H, shape.I)
                            lhs = jax.ShapeDtypeStruct((3 * bm, n if transpose else k), jnp.float32)
                            be = jax.ShapeDtypeStruct((3,), jnp.int32)
                            jax.jit(lambda a, b, wv, ws, params=params: cuda.gmm(
                                a, b, wv, ws, **params)).trace(
                                lhs, be, getattr(w, which), getattr(w, which + "_scale")).lower(
                                lowering_platforms=("cuda",))
        print(f"gmm {shape.name}: compiled ({time.time() - t0:.0f} s)", flush=True)
    for name, (lay, T, shape, act, gate_up, quant) in t.GRAD_CASES.items():
        w = moe_cases.make_weights(shape, gate_up=gate_up, bias=True, layout=lay)
        x, tw, ids = moe_cases.make_tokens(shape, T, seed=T, dtype=jnp.float32)
        t._grad_fn(shape, ids, act, quant).trace(x, tw, w.b1, w.b2, w, x).lower(
            lowering_platforms=("cuda",))
    print(f"grad cases: compiled ({time.time() - t0:.0f} s)", flush=True)


def sanitize():
    """Small grouped matmuls of every kernel kind (the Gluon one at 64 and 128
    rows per block, both orientations, dead blocks; the Triton one), each
    against the float64 oracle, then one small gradient: a short run for
    compute-sanitizer's memcheck and racecheck."""
    sys.path.insert(0, "tests")
    import moe_cases
    from jax_mxfp4_moe.cuda import backend as cuda
    for layout, bm, shape in (("sm90", 128, moe_cases.GPT_OSS_LIKE), ("sm90", 64, moe_cases.ODD_K),
                              ("canonical", 16, moe_cases.ODD_K)):
        for which in ("w1", "w2"):
            for transpose in (False, True):
                w, lhs, be = moe_cases.gmm_problem(shape, which=which, transpose=transpose,
                                                   layout=layout, block_m=bm,
                                                   experts=[1, -1, 0, 2, -1])
                params = moe_cases.gmm_params(w, which=which, transpose=transpose, block_m=bm)
                got = np.asarray(jax.jit(lambda a, b, x, y, params=params: cuda.gmm(
                    a, b, x, y, **params))(jnp.asarray(lhs), jnp.asarray(be), getattr(w, which),
                                           getattr(w, which + "_scale")))
                want = moe_cases.gmm_oracle(w, which, lhs, be, bm, transpose)
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                print(f"gmm {layout} BM {bm} {which} transpose={transpose}: rel err {err:.2e}")
                assert err < 1e-5
    w = moe_cases.make_weights(moe_cases.GPT_OSS_LIKE, gate_up="interleaved", layout="sm90")
    x, tw, ids = moe_cases.make_tokens(moe_cases.GPT_OSS_LIKE, 300, dtype=jnp.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(api.moe(x, w, tw, ids, activation="swiglu_oai") ** 2)))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    print("grad: ok")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("time", "warm", "sanitize"))
    ap.add_argument("--preset", default="gpt-oss-120b")
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--quant", default="a16w4")
    ap.add_argument("--layout", default="sm90")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--routings", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--compare", help="also time the derivative of this file's moe_jvp "
                    "(another version of layer/autodiff.py) as fwd_bwd_compare")
    ap.add_argument("--hlo", help="write the optimised HLO of the forward + backward here")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    tokens = [int(t) for t in a.tokens.split(",")]
    if a.mode == "warm":
        warm(a.preset.split(","), tokens, a.quant, a.layout)
        return 0
    if a.mode == "sanitize":
        sanitize()
        return 0
    from jax_mxfp4_moe.layer import autodiff
    ours = autodiff.moe_jvp
    variants = {"fwd_bwd": lambda: setattr(autodiff, "moe_jvp", ours)}
    if a.compare:
        import importlib.util
        spec = importlib.util.spec_from_file_location("autodiff_compare", a.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        variants["fwd_bwd_compare"] = lambda: setattr(autodiff, "moe_jvp", other.moe_jvp)
    results = []
    for preset in a.preset.split(","):
        for T in tokens:
            res = time_layer(preset, T, a.quant, reps=a.reps, routings=a.routings,
                             layout=a.layout, variants=variants, profile=a.profile, hlo=a.hlo)
            _report(res)
            results.append(res)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
