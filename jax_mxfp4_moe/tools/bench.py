"""Bench: ``python -m jax_mxfp4_moe.tools.bench --preset gpt-oss-120b --tokens 1,8,64``.

For each T it times, in one process: this package's ``moe``, and the JAX
baselines: bf16 weights + ``jax.lax.ragged_dot``; MXFP4 storage dequantised in
jnp + ``ragged_dot``; bf16 weights through Pallas' Mosaic-GPU ragged_dot
(where the installed jax has it, on a GPU). It reports the median over timed
reps, achieved TB/s and TFLOP/s, the ratio of each baseline to ours, and the
percentage of the roofline (docs/DESIGN.md §6): max(bytes of the experts touched /
HBM bandwidth, 2*T*k*3*H*I / bf16 peak), both measured at start.

Honest timing: each rep runs the layer over R different routings inside one
jitted call (one dispatch; each routing its own argument, as a model's router
hands each layer its own arrays), so the weights a rep streams (R x the
experts one call touches) do not sit in L2 from the previous call; time per
layer call = rep time / R. Only the bytes of the experts each routing touches
count. Reps are dispatched back to back, as a serving loop does, so the host's
work for a rep overlaps the GPU's for the one before: a sample is the wall
time of a batch of reps / the batch (batches of ~10 ms), the median of
``reps`` samples is reported. "ours" is also timed one rep at a time, each
waited for (``sync_time_s``: the host's fixed cost of a jit call included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import formats, jnp_layer
from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.layer.weights import MoEWeights

MXFP4_BYTES_PER_WEIGHT = 0.5 + 1 / 32  # fp4 element + its share of a scale byte


# The presets are the layer spec's (spec.PRESETS): a LayerSpec each.
PRESETS = spec.PRESETS
Preset = spec.LayerSpec

BASELINES = ("bf16_ragged_dot", "mxfp4_dequant_ragged_dot", "mosaic_gpu_ragged_dot",
             "mxfp4_dequant_dense")
# Short names of the table's columns (the JSON keeps the full ones).
LABELS = {"ours_fwd_bwd": "ours fwd+bwd", "bf16_ragged_dot": "bf16+ragged", "mxfp4_dequant_ragged_dot": "dequant+ragged",
          "mosaic_gpu_ragged_dot": "mosaic-gpu", "mxfp4_dequant_dense": "dequant+dense"}
GPU_ONLY_BASELINES = ("mosaic_gpu_ragged_dot",)

# Defaults per platform.  On a GPU: decode to prefill sizes and the GPU
# baselines.  On CPU (the jnp path; a layer call is milliseconds, not
# microseconds): a small T range, no roofline (HBM and tensor-core ceilings
# are GPU facts), and the dequantise-inside-the-jit baselines, dense (every
# expert for every token: what XLA:CPU runs fastest) and ragged.
DEFAULTS = {
    "gpu": dict(tokens=(1, 8, 64, 512, 4096, 16384), reps=20, routings=8, warmup=3,
                baselines=("bf16_ragged_dot", "mxfp4_dequant_ragged_dot", "mosaic_gpu_ragged_dot")),
    "cpu": dict(tokens=(1, 8, 64), reps=5, routings=1, warmup=1,
                baselines=("mxfp4_dequant_dense", "mxfp4_dequant_ragged_dot")),
}


def platform_kind(device=None) -> str:
    """"gpu" for an NVIDIA or AMD GPU, else "cpu" (the defaults' key)."""
    dev = device or jax.devices()[0]
    return "gpu" if dev.platform in ("gpu", "cuda", "rocm") else "cpu"


# ---------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------

def _time(fn, *args, reps: int, warmup: int = 2) -> list[float]:
    """Wall time of each of `reps` calls, each waited for before the next."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


# A pipelined sample dispatches calls back to back for about this long.
PIPELINE_SAMPLE_S = 10e-3
PIPELINE_MAX_BATCH = 64


def _time_pipelined(fn, *args, reps: int, warmup: int = 2) -> list[float]:
    """Time per call of `reps` samples, each a batch of calls dispatched back
    to back (the host runs ahead of the GPU) and waited for once: batch =
    enough calls for ~PIPELINE_SAMPLE_S, from warm calls' median."""
    single = statistics.median(_time(fn, *args, reps=3, warmup=warmup))
    batch = int(min(PIPELINE_MAX_BATCH, max(1, PIPELINE_SAMPLE_S // max(single, 1e-9))))
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batch):
            last = fn(*args)
        jax.block_until_ready(last)
        out.append((time.perf_counter() - t0) / batch)
    return out


def _on_cuda_gpu() -> bool:
    """A Hopper GPU and the launcher: the CUDA backend's own probes can run."""
    try:
        from jax_mxfp4_moe.cuda import backend
    except ImportError:
        return False
    return backend.available()


def bandwidth_probes(nbytes: int, reps: int = 10) -> dict:
    """HBM rate (bytes/s) by each probe over ``nbytes`` of f32: a reduction
    (XLA; reads), a copy (XLA; reads + writes) and, on a Hopper GPU with the
    launcher, a Triton streaming read (cuda/probes.py). One probe alone can
    read low (the issue that started this: 3.33 TB/s where another read 3.96
    on the same H200), so the roofline takes the best."""
    n = nbytes // 4
    a = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    out = {}
    t = statistics.median(_time(jax.jit(lambda v: jnp.sum(v)), a, reps=reps))
    out["jnp.sum"] = n * 4 / t
    t = statistics.median(_time(jax.jit(lambda v: v * 2.0 + 1.0), a, reps=reps))
    out["copy (read + write)"] = 2 * n * 4 / t
    if _on_cuda_gpu():
        try:
            from jax_mxfp4_moe.cuda import probes
            t = statistics.median(_time(probes.stream_read(n), a, reps=reps))
            out["triton stream read"] = n * 4 / t
        except Exception as e:  # noqa: BLE001 - a probe that cannot run is skipped, said so
            print(f"# triton stream read probe skipped: {type(e).__name__}: {str(e)[:160]}")
    del a
    return out


def matmul_probes(size: int, reps: int = 10) -> dict:
    """Dense bf16 matmul rate (FLOP/s) on random data by each probe:
    ``jnp.dot`` (XLA: cuBLAS on NVIDIA) and, on a Hopper GPU with the
    launcher, a tuned Triton matmul (cuda/probes.py)."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (size, size), jnp.bfloat16)
    b = jax.random.normal(k2, (size, size), jnp.bfloat16)
    out = {}
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    out["jnp.dot"] = 2 * size ** 3 / statistics.median(_time(f, a, b, reps=reps))
    if _on_cuda_gpu() and size % 256 == 0:
        try:
            from jax_mxfp4_moe.cuda import probes
            t = statistics.median(_time(probes.matmul_bf16(size), a, b, reps=reps))
            out["triton matmul"] = 2 * size ** 3 / t
        except Exception as e:  # noqa: BLE001
            print(f"# triton matmul probe skipped: {type(e).__name__}: {str(e)[:160]}")
    return out


def measure_bandwidth(nbytes: int) -> float:
    """HBM bandwidth (bytes/s): the best of bandwidth_probes."""
    return max(bandwidth_probes(nbytes).values())


def measure_bf16_peak(size: int) -> float:
    """Dense bf16 matmul rate (FLOP/s): the best of matmul_probes."""
    return max(matmul_probes(size).values())


def profile_layer(fn, *args) -> list:
    """Per-kernel device time of one call of fn(*args) from JAX's profiler:
    [(kernel name, total seconds, launches)], longest first. Reads the
    perfetto trace's complete events on device processes (CUPTI activity)."""
    import glob
    import gzip
    import tempfile

    jax.block_until_ready(fn(*args))  # compiled and warm
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        paths = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not paths:
            return []
        with gzip.open(paths[0], "rt") as f:
            events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    device_pids = {e.get("pid") for e in events
                   if e.get("ph") == "M" and e.get("name") == "process_name"
                   and "/device:" in str(e.get("args", {}).get("name", ""))
                   and "CPU" not in str(e.get("args", {}).get("name", ""))}
    totals = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
            t, c = totals.get(e["name"], (0.0, 0))
            totals[e["name"]] = (t + e["dur"] * 1e-6, c + 1)
    return sorted(((n, t, c) for n, (t, c) in totals.items()), key=lambda r: -r[1])


# ---------------------------------------------------------------------------
# Problem set-up
# ---------------------------------------------------------------------------

def random_weights(p: Preset, key) -> MoEWeights:
    """Random MXFP4 weights generated on the device (no host round trip)."""
    E, H, I = p.num_experts, p.hidden, p.intermediate
    ks = jax.random.split(key, 6)

    def u8(k, shape):  # 32-bit draws viewed as bytes: no 4x temporary (deepseek-v3 fits)
        words = jax.random.bits(k, (*shape[:-1], shape[-1] // 4), jnp.uint32)
        return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(shape)

    # Scales near 2**-5 keep activations O(1) through both layers.
    sc = lambda k, shape: jax.random.randint(k, shape, 119, 124, jnp.int32).astype(jnp.uint8)
    b1 = jax.random.normal(ks[4], (E, 2 * I), jnp.float32) * 0.1 if p.has_b1 else None
    b2 = jax.random.normal(ks[5], (E, H), jnp.float32) * 0.1 if p.has_b2 else None
    return MoEWeights(u8(ks[0], (E, 2 * I, H // 2)), sc(ks[1], (E, 2 * I, H // 32)),
                      u8(ks[2], (E, H, I // 2)), sc(ks[3], (E, H, I // 32)), b1, b2,
                      num_experts=E, hidden=H, intermediate=I,
                      gate_up=p.gate_up).with_scale_max()


def random_routings(p: Preset, T: int, count: int, seed: int):
    """`count` routings, each T tokens to k distinct experts (top-k of random logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((count, T, p.num_experts))
    ids = np.argsort(-logits, axis=-1)[..., :p.top_k].astype(np.int32)
    w = rng.random((count, T, p.top_k)).astype(np.float32)
    w /= w.sum(-1, keepdims=True)
    return ids, w


def expert_bytes(p: Preset) -> float:
    """HBM bytes of one expert in MXFP4 (+ f32 biases)."""
    elems = 3 * p.hidden * p.intermediate
    return elems * MXFP4_BYTES_PER_WEIGHT + 4 * (2 * p.intermediate * p.has_b1 + p.hidden * p.has_b2)


def touched_bytes(p: Preset, ids: np.ndarray, T: int) -> float:
    """Bytes one call must move: its distinct experts, x read and y written (bf16)."""
    return len(np.unique(ids)) * expert_bytes(p) + 2 * 2 * T * p.hidden


def flops(p: Preset, T: int) -> float:
    return p.flops(T)


# ---------------------------------------------------------------------------
# Baselines (jnp)
# ---------------------------------------------------------------------------

def _sorted_rows(x, topk_ids, E):
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros(E, jnp.int32).at[flat].add(1)
    return order, x[order // k], sizes


def _layer_dense(x, topk_weights, topk_ids, w1t, w2t, b1, b2, p: Preset, matmul):
    """Routing + two grouped matmuls + weighted combine, with w1t [E, H, 2I], w2t [E, I, H]."""
    T, k = topk_ids.shape
    order, xs, sizes = _sorted_rows(x, topk_ids, p.num_experts)
    h = matmul(xs, w1t, sizes).astype(jnp.float32)
    e_sorted = topk_ids.reshape(-1)[order]
    if b1 is not None:
        h = h + b1[e_sorted]
    a = jnp_layer.activation_fn(h, p.activation, p.gate_up).astype(x.dtype)
    o = matmul(a, w2t, sizes).astype(jnp.float32)
    if b2 is not None:
        o = o + b2[e_sorted]
    o = o * topk_weights.reshape(-1)[order][:, None]
    y = jnp.zeros((T, p.hidden), jnp.float32).at[order // k].add(o)
    return y.astype(x.dtype)


def _ragged(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)


def _mosaic(lhs, rhs, sizes):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    n = rhs.shape[2]
    bn = 128 if n % 128 == 0 else 64
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, block_m=64, block_n=bn,
                                      block_k=64, max_concurrent_steps=4, grid_block_n=1)


def _forward_backward(p: Preset, quant: str, backend: str):
    """One layer call and its backward: the gradients of sum(y * x) (x as the
    cotangent) in x, topk_weights and the biases, as training computes them."""
    import dataclasses

    from jax_mxfp4_moe.layer import api

    def step(w, x, tw, ids):
        def loss(x, tw, b1, b2):
            y = api.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids,
                        activation=p.activation, quant=quant, backend=backend)
            return jnp.sum(y.astype(jnp.float32) * x.astype(jnp.float32))
        argnums = (0, 1) + ((2,) if w.b1 is not None else ()) + ((3,) if w.b2 is not None else ())
        return jax.grad(loss, argnums=argnums)(x, tw, w.b1, w.b2)
    return step


def make_layers(p: Preset, w: MoEWeights, quant: str, baselines, backend: str,
                ours_weights: MoEWeights | None = None, grad: bool = False):
    """name -> (jitted fn(params, x, topk_weights[R], topk_ids[R]) running R layer
    calls, params). Weights are arguments, never closed-over constants; ours
    gets ours_weights (the same weights in its backend's layout) when given,
    the baselines w (canonical). grad: also "ours_fwd_bwd", a forward and a
    backward per call (_forward_backward)."""
    from jax_mxfp4_moe.layer import api

    def over_routings(layer):  # tws, idss: tuples of R arrays (no slicing in the jit)
        def run(params, x, tws, idss):
            return [layer(params, x, tw, ids) for tw, ids in zip(tws, idss)]
        return jax.jit(run)

    layers = {"ours": (over_routings(lambda w, x, tw, ids: api.moe(
        x, w, tw, ids, activation=p.activation, quant=quant, backend=backend)),
        w if ours_weights is None else ours_weights)}
    if grad:
        layers["ours_fwd_bwd"] = (over_routings(_forward_backward(p, quant, backend)),
                                  layers["ours"][1])
    dense = None
    if "bf16_ragged_dot" in baselines or "mosaic_gpu_ragged_dot" in baselines:
        try:
            dense = jax.jit(lambda w: dict(
                w1t=jnp.swapaxes(formats.dequantize_mxfp4(w.w1, w.w1_scale, jnp.bfloat16), 1, 2),
                w2t=jnp.swapaxes(formats.dequantize_mxfp4(w.w2, w.w2_scale, jnp.bfloat16), 1, 2),
                b1=w.b1, b2=w.b2))(w)
        except Exception as e:  # noqa: BLE001 - reported per baseline below
            dense = e
    for name, matmul in (("bf16_ragged_dot", _ragged), ("mosaic_gpu_ragged_dot", _mosaic)):
        if name not in baselines or (name.startswith("mosaic") and jax.default_backend() != "gpu"):
            continue
        layers[name] = (over_routings(lambda d, x, tw, ids, mm=matmul: _layer_dense(
            x, tw, ids, d["w1t"], d["w2t"], d["b1"], d["b2"], p, mm)), dense)
    if "mxfp4_dequant_dense" in baselines:
        def dequant_dense_layer(w, x, tw, ids):
            w1 = formats.dequantize_mxfp4(w.w1, w.w1_scale, jnp.bfloat16)  # [E, 2I, H]
            w2 = formats.dequantize_mxfp4(w.w2, w.w2_scale, jnp.bfloat16)  # [E, H, I]
            h = jnp.einsum("th,enh->etn", x, w1, preferred_element_type=jnp.float32)
            if w.b1 is not None:
                h = h + w.b1[:, None, :]
            a = jnp_layer.activation_fn(h, p.activation, p.gate_up).astype(x.dtype)
            o = jnp.einsum("eti,ehi->eth", a, w2, preferred_element_type=jnp.float32)
            if w.b2 is not None:
                o = o + w.b2[:, None, :]
            # each token's routing weight per expert (0 for experts it did not pick)
            gate = jnp.zeros((x.shape[0], p.num_experts), jnp.float32).at[
                jnp.arange(x.shape[0])[:, None], ids].add(tw)
            return jnp.einsum("eth,te->th", o, gate).astype(x.dtype)
        layers["mxfp4_dequant_dense"] = (over_routings(dequant_dense_layer), w)
    if "mxfp4_dequant_ragged_dot" in baselines:
        def dequant_layer(w, x, tw, ids):
            w1t = jnp.swapaxes(formats.dequantize_mxfp4(w.w1, w.w1_scale, jnp.bfloat16), 1, 2)
            w2t = jnp.swapaxes(formats.dequantize_mxfp4(w.w2, w.w2_scale, jnp.bfloat16), 1, 2)
            return _layer_dense(x, tw, ids, w1t, w2t, w.b1, w.b2, p, _ragged)
        layers["mxfp4_dequant_ragged_dot"] = (over_routings(dequant_layer), w)
    return layers


# Up to this many tokens a layer call is short enough (< ~1 ms) that the host's
# cost of one jit call (~65 us measured on the H100, bench/NOTES.md) would
# swamp it: every rep then runs `requested` layer calls, as a model's step runs
# tens of layers in one jit.
AMORTISE_MAX_TOKENS = 512


def routings_for(p: Preset, T: int, requested: int, l2_bytes: float = 50e6) -> int:
    """Layer calls (each with its own routing, so none is computed twice) per
    rep: `requested` for short calls, else enough to stream >= 4x the L2."""
    if T <= AMORTISE_MAX_TOKENS:
        return max(1, requested)
    per_call = min(p.num_experts, T * p.top_k) * expert_bytes(p)
    return max(1, min(requested, -(-int(4 * l2_bytes) // int(per_call))))


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "Out of memory" in s


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------

WIDTH = 120  # every line the bench prints fits this many columns


def _wrapped(log):
    """log, with "#" comment lines wrapped at WIDTH (table lines fit already)."""
    import textwrap

    def out(line):
        if line.startswith("#") and len(line) > WIDTH:
            for part in textwrap.wrap(line, WIDTH, subsequent_indent="#   "):
                log(part)
        else:
            log(line)
    return out


def run(preset: str, tokens=None, quant: str = "a16w4", *, reps: int | None = None,
        routings: int | None = None, warmup: int | None = None, baselines=None, backend: str = "auto",
        layout: str = "auto", ceilings=None, profile: bool = False, grad: bool = False,
        log=print) -> dict:
    """Times ours and the baselines at each T. tokens, reps, baselines: None
    takes the platform's DEFAULTS. layout: the weight layout ours reads;
    "auto" is the one its backend's kernels load best (LAYOUT_NAME). On a GPU
    every row also has the roofline from the measured ceilings; on CPU none.
    grad: also ours_fwd_bwd, a forward and backward per call."""
    p = PRESETS[preset]
    log = _wrapped(log)
    dev = jax.devices()[0]
    kind = platform_kind(dev)
    gpu = kind == "gpu"
    defaults = DEFAULTS[kind]
    tokens = defaults["tokens"] if tokens is None else tokens
    reps = defaults["reps"] if reps is None else reps
    routings = defaults["routings"] if routings is None else routings
    warmup = defaults["warmup"] if warmup is None else warmup
    baselines = defaults["baselines"] if baselines is None else baselines
    if not gpu:
        baselines = tuple(b for b in baselines if b not in GPU_ONLY_BASELINES)
    bw = peak = None
    bws, peaks = {}, {}
    if gpu and ceilings is None:
        bws = bandwidth_probes(4 << 30)
        peaks = matmul_probes(8192)
        log("# HBM probes: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bws.items())
            + "; bf16 probes: " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items()))
        bw, peak = max(bws.values()), max(peaks.values())
    elif gpu:
        bw, peak = ceilings
    header = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  preset=preset, quant=quant, reps=reps, routings=routings, baselines=list(baselines),
                  hbm_bytes_per_s=bw, bf16_flops_per_s=peak, hbm_probes=bws, bf16_probes=peaks)
    if gpu:
        log(f"# device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; "
            f"HBM {bw / 1e12:.2f} TB/s, bf16 peak {peak / 1e12:.0f} TFLOP/s (best probes, measured; "
            "every % below is against these)")
    else:
        log(f"# device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; no roofline "
            "on CPU (HBM and bf16 ceilings are GPU facts): times and ratios only")
    from jax_mxfp4_moe.layer import primitive
    impl = primitive.choose_path(primitive.device_platform(dev), p.replace(quant=quant), backend)
    if layout == "auto":
        layout = (layouts.CANONICAL if impl == "jnp"
                  else primitive.kernel_backend(impl).LAYOUT_NAME)
    header["ours"], header["layout"] = impl, layout
    log(f"# preset {preset}: E={p.num_experts} k={p.top_k} H={p.hidden} I={p.intermediate} "
        f"{p.activation.name}/{p.gate_up} bias={p.has_b1 or p.has_b2}; quant {quant}; ours = {impl} "
        f"({layout} weights); median of {reps} reps, each over up to {routings} routings")
    log("# us per layer call; a baseline's (xR): its time over ours" + (
        "; 1-by-1: ours with each call waited for" if gpu else ""))
    columns = (("ours_fwd_bwd",) if grad else ()) + tuple(baselines)
    log(format_header(columns, gpu))
    w = random_weights(p, jax.random.key(42))
    w_ours = w.to_layout(layout)  # once, as a user lays out weights at load time
    rows = []
    for T in tokens:
        x = jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16)
        R = routings_for(p, T, routings)
        ids, tw = random_routings(p, T, R, seed=T)
        nbytes = float(np.mean([touched_bytes(p, ids[r], T) for r in range(R)]))
        fl = flops(p, T)
        roof = max(nbytes / bw, fl / peak) if gpu else None
        row = dict(T=T, routings=R, bytes=nbytes, flops=fl, roofline_s=roof, results={})
        layers = make_layers(p, w, quant, baselines, backend, w_ours, grad=grad)
        ids_d = tuple(jnp.asarray(a) for a in ids)
        tw_d = tuple(jnp.asarray(a) for a in tw)
        for name, (fn, params) in layers.items():
            try:
                if isinstance(params, Exception):
                    raise params
                times = _time_pipelined(fn, params, x, tw_d, ids_d, reps=reps, warmup=warmup)
                t = statistics.median(times) / R
                row["results"][name] = dict(status="ok", time_s=t)
                if gpu:
                    row["results"][name].update(tb_s=nbytes / t / 1e12, tflop_s=fl / t / 1e12,
                                                pct_roofline=100 * roof / t)
                if name == "ours" and gpu:  # the host's cost of a call is a GPU question
                    row["results"][name]["sync_time_s"] = statistics.median(
                        _time(fn, params, x, tw_d, ids_d, reps=reps, warmup=0)) / R
            except Exception as e:  # a baseline that cannot run is reported, not fatal
                status = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
                if name == "ours" and status != "OOM":
                    raise
                row["results"][name] = dict(status=status)
        if profile and "ours" in layers and not isinstance(layers["ours"][1], Exception):
            fn, params = layers["ours"]
            kernels = profile_layer(fn, params, x, tw_d, ids_d)
            row["profile"] = [dict(name=n, time_s=t / R, launches=c / R) for n, t, c in kernels]
            log(f"#   T={T} per-kernel device time of one layer call (profiler, mean of {R} "
                "routings): " + (", ".join(f"{n} {t / R * 1e6:.1f} us" for n, t, _ in kernels)
                                 or "no device events in the trace"))
        ours = row["results"].get("ours", {}).get("time_s")
        for name, r in row["results"].items():
            if name != "ours" and r.get("status") == "ok" and ours:
                r["ratio_to_ours"] = r["time_s"] / ours
        rows.append(row)
        log(format_row(row, columns, gpu))
        del layers
        jax.clear_caches()
    return dict(header=header, rows=rows)


def run_mesh(preset: str, tokens, quant: str, mesh_shape, *, reps: int = 20, routings: int = 8,
             warmup: int = 3, backend: str = "auto", log=print) -> dict:
    """``--mesh EPxTP``: parallel.moe per strategy, the bytes each device sends
    and receives per call (parallel.comm_bytes) beside the time, which is
    measured only when the machine has EP*TP devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jax_mxfp4_moe.layer import parallel

    p = PRESETS[preset]
    ep, tp = mesh_shape
    devs = jax.devices()
    mesh = (Mesh(np.array(devs[:ep * tp]).reshape(ep, tp), ("ep", "tp"))
            if len(devs) >= ep * tp else None)
    ragged = parallel.ragged_supported(mesh) if mesh else devs[0].platform != "cpu"
    strategies = parallel.STRATEGIES if ep > 1 else ("tensor",)  # TP only: one way
    axes = dict(expert_axis="ep" if ep > 1 else None, tensor_axis="tp" if tp > 1 else None)
    timing = (f"timed on {ep * tp} devices" if mesh else
              f"only {len(devs)} devices: bytes computed, not timed")
    log(f"# mesh {ep}x{tp} (EP x TP): {timing}; ragged all_to_all: {ragged}")
    w = parallel.shard_weights(random_weights(p, jax.random.key(42)), mesh, **axes) if mesh else None
    rows = []
    for T in tokens:
        row = dict(T=T, mesh=f"{ep}x{tp}", results={})
        if mesh:  # tokens sharded over EP where T divides evenly (parallel.moe pads otherwise)
            ea = axes["expert_axis"] if T % ep == 0 else None
            x = jax.device_put(jax.random.normal(jax.random.key(T), (T, p.hidden), jnp.bfloat16),
                               NamedSharding(mesh, P(ea)))
            ids, tw = random_routings(p, T, routings, seed=T)
            tok = NamedSharding(mesh, P(None, ea))
            ids_d, tw_d = jax.device_put(ids, tok), jax.device_put(tw, tok)
        for strategy in strategies:
            cb = parallel.comm_bytes("gather_scatter" if strategy == "tensor" else strategy,
                                     devices=ep, tensor_devices=tp, tokens=T, top_k=p.top_k,
                                     hidden=p.hidden, dtype_bytes=2, ragged=ragged,
                                     experts=p.num_experts)
            r = dict(sent_bytes=cb["sent"], received_bytes=cb["received"])
            if mesh:
                def layer(x, tws, idss, strategy=strategy):
                    return [parallel.moe(x, w, tws[i], idss[i], mesh=mesh,
                                         strategy="auto" if strategy == "tensor" else strategy,
                                         ragged=ragged, activation=p.activation, quant=quant,
                                         backend=backend, **axes) for i in range(routings)]
                times = _time(jax.jit(layer), x, tw_d, ids_d, reps=reps, warmup=warmup)
                r["time_s"] = statistics.median(times) / routings
            row["results"][strategy] = r
        rows.append(row)
        log(f"T={T:>6}  mesh {ep}x{tp} | " + " | ".join(
            f"{n}: " + (f"{r['time_s'] * 1e6:9.1f} us, " if "time_s" in r else "")
            + f"sent {r['sent_bytes'] / 1e6:.3f} MB recv {r['received_bytes'] / 1e6:.3f} MB"
            for n, r in row["results"].items()))
    return dict(header=dict(preset=preset, quant=quant, mesh=f"{ep}x{tp}", ragged=ragged,
                            timed=mesh is not None), rows=rows)


def _us(seconds) -> str:
    """Microseconds with 4 significant digits, never a rounded-away zero."""
    us = seconds * 1e6
    return f"{us:.4g}" if us < 1e4 else f"{us:.0f}"


# Column widths of the table: every line fits 120 characters with all the
# GPU baselines (tests/test_bench.py checks it).
_W = dict(T=6, us=9, pct=6, tbs=5, tfs=6, base=18)


def format_header(baselines, gpu: bool) -> str:
    cols = [f"{'T':>{_W['T']}}"]
    if gpu:
        cols += [f"{'roofline':>{_W['us']}}", f"{'ours us':>{_W['us']}}", f"{'%roof':>{_W['pct']}}",
                 f"{'TB/s':>{_W['tbs']}}", f"{'TF/s':>{_W['tfs']}}", f"{'1-by-1 us':>{_W['us']}}"]
    else:
        cols += [f"{'ours us':>{_W['us']}}"]
    cols += [f"{LABELS[b] + ' us':>{_W['base']}}" for b in baselines]
    return " ".join(cols)


def format_row(row, baselines=None, gpu: bool | None = None) -> str:
    """One table line: ours (and, on a GPU, the roofline, % of it, TB/s and
    TFLOP/s), ours timed one call at a time, each baseline with its ratio to ours."""
    res = row["results"]
    gpu = row.get("roofline_s") is not None if gpu is None else gpu
    baselines = [n for n in res if n != "ours"] if baselines is None else baselines
    ours = res.get("ours", {})
    cols = [f"{row['T']:>{_W['T']}}"]
    ok = ours.get("status") == "ok"
    if gpu:
        cols.append(f"{_us(row['roofline_s']):>{_W['us']}}")
    cols.append(f"{(_us(ours['time_s']) if ok else ours.get('status', '-').split(':')[0]):>{_W['us']}}")
    if gpu:
        cols += [f"{ours['pct_roofline']:>{_W['pct'] - 1}.1f}%" if ok else " " * _W["pct"],
                 f"{ours['tb_s']:>{_W['tbs']}.2f}" if ok else " " * _W["tbs"],
                 f"{ours['tflop_s']:>{_W['tfs']}.1f}" if ok else " " * _W["tfs"]]
    if gpu:
        cols.append(f"{_us(ours['sync_time_s']) if 'sync_time_s' in ours else '-':>{_W['us']}}")
    for name in baselines:
        r = res.get(name)
        if r is None:
            cell = "-"
        elif r["status"] != "ok":
            cell = r["status"].split(":")[0]
        else:
            cell = _us(r["time_s"]) + (f" (x{r['ratio_to_ours']:.3g})" if "ratio_to_ours" in r else "")
        cols.append(f"{cell:>{_W['base']}}")
    return " ".join(cols)


def plot(results: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
    for res in results:
        h = res["header"]
        names = sorted({n for row in res["rows"] for n in row["results"]})
        for name in names:
            pts = [(row["T"], row["results"][name]) for row in res["rows"] if name in row["results"]]
            pts = [(T, r) for T, r in pts if r["status"] == "ok"]
            if not pts:
                continue
            label = f"{h['preset']} {h['quant']} {name}"
            ax_t.plot([T for T, _ in pts], [r["time_s"] * 1e6 for _, r in pts], marker="o", label=label)
            if all("pct_roofline" in r for _, r in pts):  # GPU rows only
                ax_p.plot([T for T, _ in pts], [r["pct_roofline"] for _, r in pts], marker="o", label=label)
        if all(row["roofline_s"] is not None for row in res["rows"]):
            ax_t.plot([row["T"] for row in res["rows"]], [row["roofline_s"] * 1e6 for row in res["rows"]],
                      "k--", label=f"{h['preset']} roofline")
    for ax, ylabel in ((ax_t, "time per layer call (us)"), (ax_p, "% of roofline")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_p.legend(fontsize=7)
    fig.suptitle(results[0]["header"]["device"] if results else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each option's default; options whose default depends on
    the platform say so in their help (their default is None here)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def main(argv=None) -> int:
    fmt = lambda d: ",".join(str(v) for v in d)  # noqa: E731
    ap = argparse.ArgumentParser(
        prog="python -m jax_mxfp4_moe.tools.bench", description=__doc__.split("\n\n")[0],
        formatter_class=_DefaultsFormatter)
    ap.add_argument("--preset", default="gpt-oss-120b",
                    help=f"comma-separated; of {', '.join(sorted(PRESETS))} "
                         "(small: the CPU timing case, jnp path against dequantising inside the jit)")
    ap.add_argument("--tokens", default=None,
                    help=f"comma-separated T values (default: {fmt(DEFAULTS['gpu']['tokens'])} on a GPU, "
                         f"{fmt(DEFAULTS['cpu']['tokens'])} on CPU)")
    ap.add_argument("--quant", default="a16w4", help="comma-separated: a16w4, a8w4, a4w4")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"timed reps, median reported (default: {DEFAULTS['gpu']['reps']} on a GPU, "
                         f"{DEFAULTS['cpu']['reps']} on CPU)")
    ap.add_argument("--routings", type=int, default=None,
                    help=f"routings rotated inside one rep (default: {DEFAULTS['gpu']['routings']} on a "
                         f"GPU, {DEFAULTS['cpu']['routings']} on CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"untimed calls before timing (default: {DEFAULTS['gpu']['warmup']} on a GPU, "
                         f"{DEFAULTS['cpu']['warmup']} on CPU)")
    ap.add_argument("--baselines", default=None,
                    help=f"comma-separated subset of {', '.join(BASELINES)}, or 'none' (default: "
                         f"{fmt(DEFAULTS['gpu']['baselines'])} on a GPU, "
                         f"{fmt(DEFAULTS['cpu']['baselines'])} on CPU)")
    ap.add_argument("--backend", default="auto", help="backend for ours (auto, jnp, cuda, rocm)")
    ap.add_argument("--layout", default="auto",
                    help="weight layout ours reads (auto: its backend's; canonical, sm90, gfx950)")
    ap.add_argument("--grad", action="store_true",
                    help="also time a forward and backward per layer call (gradients in x, "
                    "topk_weights and the biases), shown as ours_fwd_bwd (xN: its time over ours)")
    ap.add_argument("--profile", action="store_true",
                    help="also print each kernel's device time in one layer call (JAX profiler)")
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--plot", help="draw time and %% of roofline against T into this PNG")
    ap.add_argument("--mesh", help="EPxTP, e.g. 8x1 or 4x2: parallel.moe per strategy with the "
                    "bytes each device sends/receives per call (timed if that many devices)")
    a = ap.parse_args(argv)
    presets = a.preset.split(",")
    for name in presets:
        if name not in PRESETS:
            ap.error(f"--preset: unknown {name!r}; known: {sorted(PRESETS)}")
    baselines = (None if a.baselines is None else () if a.baselines == "none"
                 else tuple(a.baselines.split(",")))
    for b in baselines or ():
        if b not in BASELINES:
            ap.error(f"--baselines: unknown {b!r}; known: {BASELINES}")
    kind = platform_kind()
    tokens = (list(DEFAULTS[kind]["tokens"]) if a.tokens is None
              else [int(t) for t in a.tokens.split(",")])
    reps = DEFAULTS[kind]["reps"] if a.reps is None else a.reps
    routings = DEFAULTS[kind]["routings"] if a.routings is None else a.routings
    warmup = DEFAULTS[kind]["warmup"] if a.warmup is None else a.warmup
    if a.mesh:
        parts = a.mesh.lower().split("x")
        if len(parts) != 2 or not all(v.isdigit() and int(v) >= 1 for v in parts):
            ap.error(f"--mesh: expected EPxTP such as 4x2, got {a.mesh!r}")
        mesh_shape = (int(parts[0]), int(parts[1]))
        mesh_results = [run_mesh(name, tokens, quant, mesh_shape, reps=reps, routings=routings,
                                 warmup=warmup, backend=a.backend)
                        for name in presets for quant in a.quant.split(",")]
        if a.json:
            with open(a.json, "w") as f:
                json.dump(mesh_results, f, indent=1)
        return 0
    results, ceilings = [], None
    for name in presets:
        for quant in a.quant.split(","):
            res = run(name, tokens, quant, reps=reps, routings=routings, warmup=warmup,
                      baselines=baselines, backend=a.backend, layout=a.layout, ceilings=ceilings,
                      profile=a.profile, grad=a.grad)
            h = res["header"]
            if h["hbm_bytes_per_s"] is not None:  # measured once (GPU)
                ceilings = (h["hbm_bytes_per_s"], h["bf16_flops_per_s"])
            results.append(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.plot:
        plot(results, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
