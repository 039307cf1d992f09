"""``python -m jax_mxfp4_moe.selfcheck``: every shipped kernel variant on this machine's GPU, against the reference.

For the first person who runs the package on an MI355X (gfx950) or a Hopper
GPU (sm_90): runs the local backend's kernels at small shapes and at one
shape of each preset and compares each with its oracle:

- sort: the kernels' sort contract == ``numerics.sorting.moe_sort``, bit for
  bit (one-launch and chunked sizes, with and without an expert mask);
- quant: the MX quantiser == ``numerics.formats.quantize``, bit for bit
  (mxfp4 / mxfp8, bf16 / f32 input, zero blocks, fp8 clipping);
- gemm1, gemm2 (ROCm: each stage alone against the NumPy functional model;
  CUDA: through the layer, in each of its kernel regimes: the one-launch
  decode kernel, the sorted path, the wgmma prefill path);
- the layer, called as a user calls it (``moe(..., backend=...)`` under jit):
  against the float64 reference (``numerics.reference``) for every
  quant mode the backend runs, both activations, both gate/up placements,
  with and without biases, canonical and the backend's layout, atomic and
  deterministic gemm2, edge routings (ids that route nowhere, an expert mask,
  T = 0), and each preset of ``spec.PRESETS`` at T = 64 (rows checked
  against the reference on the experts they touch).

The tolerances are the tests' (``numerics.accuracy``: relative Frobenius
error 1e-2, max-abs 5% of the largest output; sort and quant exact).  One
line per check: PASS/FAIL, the error against its tolerance, the wall time
(compilation included).  A JSON report (``--json``; default
``selfcheck-<backend>.json``) holds the machine, versions and every check,
to attach to a bug report.  Exit status: 0 all passed, 1 a check failed,
3 no GPU the kernels run on (it says what it found).  Needs no pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform as host_platform
import sys
import time
import traceback
from typing import Callable

import numpy as np

NO_GPU_EXIT = 3
FAIL_EXIT = 1
BACKENDS = ("cuda", "rocm")
PRESET_TOKENS = 64
PRESET_REF_ROWS = 48  # rows of a preset's output checked against the float64 reference
SMALL = dict(E=8, k=4, H=256, I=256)        # gpt-oss-like, interleaved
SMALL_DS = dict(E=16, k=8, H=256, I=128)    # deepseek-like, separated
ODD_K = dict(E=4, k=2, H=160, I=96)         # H, I not multiples of 128 (like gpt-oss's 2880)


@dataclasses.dataclass
class Check:
    """One check: ``run()`` returns (error, tolerance, detail); it passes
    when error <= tolerance.  ``kind``: sort, quant, gemm, layer, preset."""

    name: str
    kind: str
    run: Callable[[], tuple]


# ---------------------------------------------------------------------------
# The backend under test
# ---------------------------------------------------------------------------

def _backend_module(name):
    if name == "cuda":
        from jax_mxfp4_moe.cuda import backend
    elif name == "rocm":
        from jax_mxfp4_moe.rocm import backend
    elif name == "jnp":  # the checker's own test on CPU: the jnp path in the kernels' place
        return _JnpBackend()
    else:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return backend


class _JnpBackend:
    """The jnp twins of the kernels' sort and quantiser (the layer checks call
    ``moe(..., backend="jnp")``): lets CI run the checker itself (plan,
    runner, report) on CPU."""

    LAYOUT_NAME = "canonical"
    QUANTS = ("a16w4", "a8w4", "a4w4")

    @staticmethod
    def sort(topk_ids, topk_weights, *, num_experts, expert_mask=None, block_m=32):
        from jax_mxfp4_moe.numerics import sorting
        return sorting.moe_sort(topk_ids, topk_weights, num_experts=num_experts, block_m=block_m,
                                expert_mask=expert_mask)

    @staticmethod
    def quantize(x, fmt):
        from jax_mxfp4_moe.numerics import formats
        return formats.quantize(x, fmt)


def backend_quants(name) -> tuple:
    if name == "rocm":
        from jax_mxfp4_moe.rocm import config
        return tuple(config.QUANTS)
    if name == "jnp":
        return _JnpBackend.QUANTS
    from jax_mxfp4_moe import spec
    return tuple(spec.QUANT_MODES)


def backend_layout(name) -> str:
    return {"cuda": "sm90", "rocm": "gfx950", "jnp": "canonical"}[name]


def detect() -> tuple[str | None, str]:
    """(the backend whose kernels run here, or None; what was found)."""
    import jax

    found = []
    for name in BACKENDS:
        try:
            devices = jax.devices(name)
        except RuntimeError:
            continue
        if not devices:
            continue
        mod = _backend_module(name)
        desc = f"{len(devices)} {name} device(s), {devices[0].device_kind}"
        if mod.available():
            return name, desc
        why = mod.unsupported(_probe_spec())
        found.append(f"{desc}: {why or 'no kernels for this device'}")
    platforms = sorted({d.platform for d in jax.devices()})
    return None, ("; ".join(found) if found else
                  f"no GPU: jax sees only {platforms} devices (a GPU needs jax's GPU build: "
                  "jax[cuda13] for NVIDIA, jax[rocm7-local] for AMD; README, Install)")


def _probe_spec():
    from jax_mxfp4_moe import spec
    return spec.LayerSpec(8, 2, 256, 256, quant="a8w4")


# ---------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------

def plan(backend: str, *, presets=True) -> list[Check]:
    """Every check for ``backend`` ("cuda", "rocm", or "jnp" for the checker's
    own test), in order; nothing runs until a check's ``run`` is called."""
    from jax_mxfp4_moe import spec

    checks = []
    add = lambda name, kind, fn, *a, **kw: checks.append(  # noqa: E731
        Check(name, kind, lambda: fn(backend, *a, **kw)))
    E, k = SMALL_DS["E"], SMALL_DS["k"]
    for T in (7, 1000):  # one launch / chunked (both backends' thresholds lie between)
        for masked in (False, True):
            add(f"sort T={T} E={E} k={k}{' masked' if masked else ''}", "sort", _check_sort,
                T=T, E=E, k=k, masked=masked)
    for fmt in ("mxfp4", "mxfp8"):
        for dtype in ("bfloat16", "float32"):
            for T, K in ((1, 256), (37, 2944)):
                add(f"quant {fmt} {dtype} [{T}, {K}]", "quant", _check_quant, fmt=fmt, dtype=dtype, T=T, K=K)
    if backend == "rocm":
        for quant in backend_quants(backend):
            for shape, act, gate_up, bias in ((ODD_K, "swiglu_oai", "interleaved", True),
                                              (SMALL, "silu", "separated", False)):
                for nt in (False, True):
                    add(f"gemm1+gemm2 {quant} {act} {gate_up} bias={bias} nt={nt} {_dims(shape)}", "gemm",
                        _check_rocm_gemms, shape=shape, quant=quant, activation=act, gate_up=gate_up,
                        bias=bias, nt=nt)
    layout = backend_layout(backend)
    for quant in backend_quants(backend):
        for act in spec.ACTIVATION_KINDS:
            for gate_up in spec.GATE_UP:
                for bias in (False, True):
                    for lay in dict.fromkeys(("canonical", layout)):
                        shape = SMALL if gate_up == "interleaved" else SMALL_DS
                        add(f"layer {quant} {act} {gate_up} bias={bias} {lay} T=23", "layer", _check_layer,
                            shape=shape, T=23, quant=quant, activation=act, gate_up=gate_up, bias=bias,
                            layout=lay)
    quant = "a8w4"
    for T in (1, 7, 64, 300):  # cuda: decode kernel / direct / sorted / prefill regimes
        for det in (False, True):
            add(f"layer {quant} T={T} {'deterministic' if det else 'atomic'} {layout}", "layer",
                _check_layer, shape=SMALL, T=T, quant=quant, activation="swiglu_oai",
                gate_up="interleaved", bias=True, layout=layout, deterministic=det)
    add(f"layer {quant} odd K {_dims(ODD_K)} {layout} T=33", "layer", _check_layer, shape=ODD_K, T=33,
        quant=quant, activation="swiglu_oai", gate_up="interleaved", bias=True, layout=layout)
    for edge in ("nowhere", "mask", "empty"):
        add(f"edge routing: {edge}", "layer", _check_edge, edge=edge, layout=layout)
    if presets:
        for name in spec.PRESETS:
            add(f"preset {name} {quant} T={PRESET_TOKENS} {layout}", "preset", _check_preset,
                preset=name, quant=quant, layout=layout)
    return checks


def _dims(s):
    return f"E={s['E']} k={s['k']} H={s['H']} I={s['I']}"


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def _weights(shape, *, gate_up, bias, layout, seed=0):
    from jax_mxfp4_moe.layer.weights import prepare_weights

    rng = np.random.default_rng(seed)
    E, H, I = shape["E"], shape["H"], shape["I"]
    w1 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) / np.sqrt(H)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32) / np.sqrt(I)
    b1 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1 if bias else None
    b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1 if bias else None
    return prepare_weights(w1, w2, b1, b2, gate_up=gate_up, layout=layout)


def _tokens(shape, T, seed=1):
    import jax.numpy as jnp
    from jax_mxfp4_moe.layer import routing

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, shape["H"])) * 2.0, jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((T, shape["E"])), jnp.float32)
    tw, ti = routing.topk_softmax(logits, shape["k"])
    return x, tw, ti


def _layer_error(y, ref):
    """max of (relative Frobenius / its bound, max-abs fraction / its bound),
    so one number against tolerance 1; detail says both."""
    from jax_mxfp4_moe.numerics import accuracy

    y = np.asarray(np.asarray(y).astype(np.float32), np.float64)
    if y.shape != ref.shape:
        return float("inf"), 1.0, f"shape {y.shape}, expected {ref.shape}"
    if not np.array_equal(np.isfinite(y), np.isfinite(ref)):
        return float("inf"), 1.0, "NaN/Inf pattern differs from the reference"
    fro, mx = accuracy.errors(y, ref)
    err = max(fro / accuracy.REL_FROBENIUS, mx / accuracy.MAX_ABS_FRACTION)
    return err, 1.0, f"rel Frobenius {fro:.2e} (bound {accuracy.REL_FROBENIUS}), max-abs {mx:.2e} " \
                     f"(bound {accuracy.MAX_ABS_FRACTION})"


def _run_layer(backend, x, w, tw, ti, *, quant, activation, deterministic=False, mask=None):
    """The layer as a user calls it (``moe`` with the backend forced), under jit."""
    import jax
    from jax_mxfp4_moe.layer import api

    f = jax.jit(lambda x, w, tw, ti, m: api.moe(x, w, tw, ti, activation=activation, quant=quant,
                                                deterministic=deterministic, expert_mask=m,
                                                backend=backend))
    return f(x, w, tw, ti, mask)


def _check_sort(backend, *, T, E, k, masked):
    import jax
    import jax.numpy as jnp
    from jax_mxfp4_moe.numerics import sorting

    mod = _backend_module(backend)
    rng = np.random.default_rng(T)
    ids = jnp.asarray(rng.integers(-1, E + 2, (T, k)), jnp.int32)  # some route nowhere
    tw = jnp.asarray(rng.random((T, k)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, E), jnp.int32) if masked else None
    if backend == "rocm":
        from jax_mxfp4_moe.rocm import config
        bm = config.SORT_BLOCK_M
        got = jax.jit(lambda i, w: mod.sort(i, w, num_experts=E, expert_mask=mask))(ids, tw)
    else:
        bm = 32
        got = jax.jit(lambda i, w: mod.sort(i, w, num_experts=E, block_m=bm, expert_mask=mask))(ids, tw)
    want = sorting.moe_sort(ids, tw, num_experts=E, block_m=bm, expert_mask=mask)
    wrong = sum(int(np.sum(np.asarray(g) != np.asarray(w))) for g, w in zip(got, want))
    return float(wrong), 0.0, f"{wrong} entries differ from numerics.sorting.moe_sort (BM={bm})"


def _check_quant(backend, *, fmt, dtype, T, K):
    import jax
    import jax.numpy as jnp
    from jax_mxfp4_moe.numerics import formats

    mod = _backend_module(backend)
    rng = np.random.default_rng(K + T)
    x = rng.standard_normal((T, K)) * np.exp2(rng.integers(-20, 20, (T, K // 32, 1))).repeat(32, -1).reshape(T, K)
    x[0, :32] = 0.0  # an all-zero block
    if K > 64:
        x[-1, 32:64] = 448.0 * 3  # beyond fp8's range: clipping
    x = jnp.asarray(x, dtype)
    q, s = jax.jit(lambda v: mod.quantize(v, fmt))(x)
    wq, ws = formats.quantize(x, fmt)
    wrong = int(np.sum(np.asarray(q) != np.asarray(wq))) + int(np.sum(np.asarray(s) != np.asarray(ws)))
    return float(wrong), 0.0, f"{wrong} bytes differ from numerics.formats.quantize"


def _check_rocm_gemms(backend, *, shape, quant, activation, gate_up, bias, nt):
    import jax.numpy as jnp
    from jax_mxfp4_moe import spec as layer_spec
    from jax_mxfp4_moe.numerics import accuracy, formats
    from jax_mxfp4_moe.rocm import functional_model as model, geometry as ix

    rocm = _backend_module(backend)
    T = 33
    w = _weights(shape, gate_up=gate_up, bias=bias, layout="gfx950")
    x, tw, ti = _tokens(shape, T)
    layer = layer_spec.LayerSpec.for_weights(w, shape["k"], activation=activation, quant=quant)
    Hp, _ = ix.padded_dims(shape["H"], shape["I"])
    s = rocm.sort(ti, tw, num_experts=shape["E"])
    xq, xs = rocm.quantize(jnp.pad(x, ((0, 0), (0, Hp - shape["H"]))), layer.mode.act_format)
    inter, inter_s = rocm.gemm1(xq, xs, w, s, layer=layer, tokens=T, nt=nt)
    y = rocm.gemm2(inter, inter_s, w, s, layer=layer, tokens=T, nt=nt)
    sn = [np.asarray(a) for a in s]
    b1 = None if w.b1 is None else np.asarray(w.b1)
    b2 = None if w.b2 is None else np.asarray(w.b2)
    m_inter, m_inter_s = model.gemm1_model(
        np.asarray(xq), np.asarray(xs), np.asarray(w.w1), np.asarray(w.w1_scale), b1, sn[0], sn[2], sn[3],
        tokens=T, hidden=shape["H"], intermediate=shape["I"], quant=quant, activation=activation,
        gate_up=gate_up)
    used = sn[3][0]
    deq = formats.dequantize_mxfp4_np if quant == "a4w4" else formats.dequantize_mxfp8_np
    g1_fro, g1_max = accuracy.errors(deq(np.asarray(inter)[:used], np.asarray(inter_s)[:used]),
                                     deq(m_inter[:used], m_inter_s[:used]).astype(np.float64))
    m_y = model.gemm2_model(np.asarray(inter), np.asarray(inter_s), np.asarray(w.w2), np.asarray(w.w2_scale),
                            b2, sn[0], sn[1], sn[2], sn[3], tokens=T, hidden=shape["H"],
                            intermediate=shape["I"], quant=quant)
    g2_fro, g2_max = accuracy.errors(np.asarray(y, np.float32), m_y.astype(np.float64))
    # gemm1's output is re-quantised: one quantisation step on a rounding boundary is allowed
    err = max(g1_fro / 1e-2, g1_max / 5e-2, g2_fro / 1e-2, g2_max / 2e-2)
    return err, 1.0, (f"gemm1 vs functional model rel {g1_fro:.2e} max {g1_max:.2e}; "
                      f"gemm2 rel {g2_fro:.2e} max {g2_max:.2e}")


def _check_layer(backend, *, shape, T, quant, activation, gate_up, bias, layout, deterministic=False):
    from jax_mxfp4_moe.numerics import reference

    w = _weights(shape, gate_up=gate_up, bias=bias, layout="canonical")
    x, tw, ti = _tokens(shape, T)
    y = _run_layer(backend, x, w.to_layout(layout), tw, ti, quant=quant, activation=activation,
                   deterministic=deterministic)
    ref = reference.moe(np.asarray(x), w, tw, ti, quant=quant, activation=activation)
    out = _layer_error(y, ref)
    if deterministic and out[0] <= 1.0:  # and the same bits on a second call
        y2 = _run_layer(backend, x, w.to_layout(layout), tw, ti, quant=quant, activation=activation,
                        deterministic=True)
        if not np.array_equal(np.asarray(y), np.asarray(y2)):
            return float("inf"), 1.0, "deterministic: two calls differ"
    return out


def _check_edge(backend, *, edge, layout):
    import jax.numpy as jnp
    from jax_mxfp4_moe.numerics import reference

    shape, quant = SMALL_DS, "a8w4"
    w = _weights(shape, gate_up="separated", bias=True, layout="canonical")
    x, tw, ti = _tokens(shape, 5)
    wl = w.to_layout(layout)
    if edge == "nowhere":  # every id outside [0, E): the output is exactly zero
        y = _run_layer(backend, x, wl, tw, jnp.full_like(ti, shape["E"] + 7), quant=quant, activation="silu")
        n = int(np.count_nonzero(np.asarray(y, np.float32)))
        return float(n), 0.0, f"{n} nonzero outputs for ids that route nowhere"
    if edge == "empty":
        y = _run_layer(backend, x[:0], wl, tw[:0], ti[:0], quant=quant, activation="silu")
        ok = tuple(y.shape) == (0, shape["H"])
        return (0.0 if ok else 1.0), 0.0, f"T=0 output shape {tuple(y.shape)}"
    # an expert mask over 2E global experts: the kept ones renumbered 0..E-1
    E = shape["E"]
    keep = np.zeros(2 * E, bool)
    keep[::2] = True
    rng = np.random.default_rng(5)
    gids = jnp.asarray(np.stack([rng.choice(2 * E, shape["k"], replace=False) for _ in range(5)]), jnp.int32)
    y = _run_layer(backend, x, wl, tw, gids, quant=quant, activation="silu", mask=jnp.asarray(keep, jnp.int32))
    local = np.where(keep[np.asarray(gids)], np.asarray(gids) // 2, -1)
    ref = reference.moe(np.asarray(x), w, tw, local, quant=quant, activation="silu")
    return _layer_error(y, ref)


def _check_preset(backend, *, preset, quant, layout):
    import jax
    import jax.numpy as jnp
    from jax_mxfp4_moe import spec
    from jax_mxfp4_moe.layer.weights import MoEWeights
    from jax_mxfp4_moe.numerics import reference
    from jax_mxfp4_moe.tools.bench import random_routings, random_weights

    p = spec.PRESETS[preset]
    w = random_weights(p, jax.random.key(7))
    T = PRESET_TOKENS
    ids, tw = random_routings(p, T, 1, seed=T)
    ids, tw = ids[0], tw[0]
    x = jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16)
    y = _run_layer(backend, x, w.to_layout(layout), jnp.asarray(tw), jnp.asarray(ids), quant=quant,
                   activation=p.activation)
    rows = slice(0, min(T, PRESET_REF_ROWS))
    # the reference on the experts these rows touch only (a preset's weights can be GBs)
    used = np.unique(ids[rows])
    sub = MoEWeights(*(None if a is None else np.asarray(a[jnp.asarray(used)]) for a in
                       (w.w1, w.w1_scale, w.w2, w.w2_scale, w.b1, w.b2)),
                     num_experts=len(used), hidden=p.hidden, intermediate=p.intermediate,
                     gate_up=p.gate_up)
    local = np.searchsorted(used, ids[rows]).astype(np.int32)
    ref = reference.moe(np.asarray(x)[rows], sub, tw[rows], local, quant=quant, activation=p.activation)
    return _layer_error(np.asarray(y)[rows], ref)


# ---------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------

def run_checks(checks, log=print) -> list[dict]:
    results = []
    for c in checks:
        t0 = time.perf_counter()
        try:
            err, tol, detail = c.run()
            status = "PASS" if err <= tol else "FAIL"
        except Exception as e:  # noqa: BLE001 - a check that raises fails, with its reason
            err, tol, status = None, None, "FAIL"
            detail = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            tb = traceback.format_exc(limit=6)
        else:
            tb = None
        seconds = time.perf_counter() - t0
        r = dict(name=c.name, kind=c.kind, status=status, error=err, tolerance=tol, seconds=seconds,
                 detail=detail)
        if tb:
            r["traceback"] = tb
        results.append(r)
        log(format_line(r))
    return results


def format_line(r) -> str:
    err = "raised" if r["error"] is None else f"err {r['error']:.2e} / tol {r['tolerance']:.0e}"
    return f"{r['status']}  {r['name']:<58.58} {err:<24} {r['seconds']:7.2f} s  {r['detail']}"


def environment(backend: str) -> dict:
    import jax
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    return dict(backend=backend, device=dev.device_kind, platform=dev.platform,
                devices=len(jax.devices()), jax=jax.__version__, jaxlib=ver("jaxlib"),
                jax_mxfp4_moe=ver("jax_mxfp4_moe"), triton=ver("triton"), flydsl=ver("flydsl"),
                python=sys.version.split()[0], host=host_platform.platform(),
                compute_capability=str(getattr(dev, "compute_capability", "")))


def report(results, backend) -> dict:
    failed = [r["name"] for r in results if r["status"] != "PASS"]
    return dict(environment=environment(backend), passed=len(results) - len(failed),
                failed=len(failed), failures=failed, checks=results)


def main(argv=None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m jax_mxfp4_moe.selfcheck",
                                 description=__doc__.split("\n\n")[0].strip("`"))
    ap.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS + ("jnp",),
                    help="auto: the GPU this machine has; jnp: the checker's own test on CPU "
                         "(default: %(default)s)")
    ap.add_argument("--json", help="report path (default: selfcheck-<backend>.json)")
    ap.add_argument("-k", "--filter", default="", help="run only checks whose name contains this")
    ap.add_argument("--no-presets", action="store_true", help="skip the preset-sized checks")
    ap.add_argument("--list", action="store_true", help="print the checks without running them")
    a = ap.parse_args(argv)
    backend = a.backend
    if a.list:
        listed = "cuda" if backend == "auto" else backend
        for c in plan(listed, presets=not a.no_presets):
            if a.filter in c.name:
                log(f"{c.kind:<6} {c.name}")
        return 0
    if backend == "auto":
        backend, found = detect()
        if backend is None:
            log(f"selfcheck: {found}; nothing to check (exit {NO_GPU_EXIT})")
            return NO_GPU_EXIT
        log(f"selfcheck: {found}: checking the {backend} kernels")
    checks = [c for c in plan(backend, presets=not a.no_presets) if a.filter in c.name]
    results = run_checks(checks, log)
    rep = report(results, backend)
    path = a.json or f"selfcheck-{backend}.json"
    with open(path, "w") as f:
        json.dump(rep, f, indent=1)
    log(f"selfcheck: {rep['passed']} passed, {rep['failed']} failed; report written to {path}")
    return FAIL_EXIT if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
