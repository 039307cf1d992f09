"""One gpt-oss MoE block from a checkpoint, end to end, checked against the model definition.

    python examples/gpt_oss_moe.py --checkpoint /path/to/gpt-oss-120b --layer 3
    python examples/gpt_oss_moe.py --synthetic gpt-oss-120b      # no download needed

Loads the router and the MXFP4 experts of one layer from a checkpoint
directory through its ``model.safetensors.index.json`` (one expert at a time,
with progress), runs the block (router -> top-k -> softmax over the k
selected logits -> ``jax_mxfp4_moe.moe``) and compares it with
``gpt_oss_moe_block`` below: a plain-jnp block written from the published
gpt-oss model definition, reading the checkpoint's raw tensors itself.
With ``--synthetic PRESET`` it first writes a one-layer checkpoint of that
preset's size in the published format (random values) into a temporary
directory.  It reports the loader's peak host memory against the layer's
packed size: the process's peak resident set while loading (VmHWM, reset
before) minus its resident set before.  The first layer a process loads in
a backend layout also pays XLA's compilation of the per-expert re-layout
(a fixed ~0.2 GB, seen on a 16-expert layer).

Exit status 1 when the block and the reference choose different experts or
disagree beyond the package's accuracy bound (a16w4: relative Frobenius error
1e-2; a8w4 / a4w4, whose quantised activations cost accuracy by design:
cosine >= 0.998 / 0.97).
In a model, ``jax_mxfp4_moe.nnx.MoE.from_gpt_oss(path, layer)`` holds the
same block as a Flax NNX module.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mxfp4_moe as mm
from jax_mxfp4_moe.layer import checkpoints

# ---------------------------------------------------------------------------
# The published model definition, in plain jnp (independent of the package's
# formats, layouts and layer)
# ---------------------------------------------------------------------------

# E2M1 values of the 16 fp4 codes (OCP MX v1.0), as gpt-oss's dequantiser lists them.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SWIGLU_ALPHA = 1.702
# Agreement required with the unquantised model definition: a16w4 by the
# package's bound (relative Frobenius error); a8w4 / a4w4 quantise the
# activations, which costs accuracy by design (README, Accuracy): cosine floors.
REL_BOUND = 1e-2
COSINE_FLOOR = {"a8w4": 0.998, "a4w4": 0.97}


def dequantize_expert(blocks, scales):
    """One expert's [N, K/32, 16] u8 blocks (two fp4 codes per byte, low nibble
    first) and [N, K/32] u8 E8M0 scales (bias 127) -> float32 [N, K]."""
    lut = jnp.asarray(FP4_VALUES, jnp.float32)
    blocks = jnp.asarray(blocks)
    codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)          # [N, G, 16, 2]
    values = lut[codes].reshape(*blocks.shape[:-1], 32)                # [N, G, 32]
    scale = jnp.exp2(jnp.asarray(scales).astype(jnp.float32) - 127.0)  # [N, G]
    return (values * scale[..., None]).reshape(blocks.shape[0], -1)


def gpt_oss_moe_block(x, router_weight, router_bias, read_expert, *, top_k, limit):
    """y [T, H] f32 of gpt-oss's MLP block (its layer norm and residual aside).

    router: logits = x W^T + b; the top_k logits, softmax over those k.
    expert e: h = W1 x + b1 with gate = h[0::2], up = h[1::2] (interleaved);
    gate = min(gate, limit); up = clip(up, -limit, limit);
    a = (up + 1) * gate * sigmoid(alpha * gate); out = W2 a + b2.
    read_expert(e) -> dict of that expert's raw checkpoint tensors."""
    x = jnp.asarray(x, jnp.float32)
    logits = x @ jnp.asarray(router_weight, jnp.float32).T + jnp.asarray(router_bias, jnp.float32)
    top_logits, ids = jax.lax.top_k(logits, top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
    y = jnp.zeros(x.shape, jnp.float32)
    for e in np.unique(np.asarray(ids)):  # each chosen expert dequantised once
        t = read_expert(int(e))
        w1 = dequantize_expert(t["gate_up_proj_blocks"], t["gate_up_proj_scales"])  # [2I, H]
        w2 = dequantize_expert(t["down_proj_blocks"], t["down_proj_scales"])        # [H, I]
        h = x @ w1.T + jnp.asarray(t["gate_up_proj_bias"], jnp.float32)
        gate, up = h[:, 0::2], h[:, 1::2]
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        a = (up + 1.0) * gate * jax.nn.sigmoid(SWIGLU_ALPHA * gate)
        out = a @ w2.T + jnp.asarray(t["down_proj_bias"], jnp.float32)
        weight = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1)  # 0 for tokens not routed to e
        y = y + weight[:, None] * out
    return y, ids


# ---------------------------------------------------------------------------
# The block through the package
# ---------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_host_memory(fn):
    """(fn(), peak resident bytes during fn above the resident bytes before).
    Linux: the peak (VmHWM) is reset first (``/proc/self/clear_refs``), so an
    earlier peak of the process does not hide this one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: _status_bytes("VmHWM")  # noqa: E731
    except OSError:  # no reset: the process's lifetime peak
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    before = _status_bytes("VmRSS")
    out = fn()
    return out, peak() - before


def load_block(path, layer, *, layout, progress=True):
    """(weights, router weight, router bias, top_k, limit, load seconds, peak extra host bytes)."""
    config = checkpoints.read_config(path)
    t0 = time.perf_counter()
    weights, peak_extra = peak_host_memory(lambda: jax.block_until_ready(
        mm.from_gpt_oss(path, layer, layout=layout, progress=progress)))
    seconds = time.perf_counter() - t0
    router_w, router_b = checkpoints.gpt_oss_router(path, layer)
    top_k = int(config.get("num_experts_per_tok", config.get("experts_per_token", 4)))
    limit = float(config.get("swiglu_limit", 7.0))
    return weights, router_w, router_b, top_k, limit, seconds, peak_extra


def run_block(x, weights, router_w, router_b, *, top_k, limit, quant):
    logits = x.astype(jnp.float32) @ jnp.asarray(router_w).T + jnp.asarray(router_b)
    topk_weights, topk_ids = mm.topk_softmax(logits, top_k)
    act = mm.Activation("swiglu_oai", limit=limit)
    y = jax.jit(lambda *a: mm.moe(*a, activation=act, quant=quant))(x, weights, topk_weights, topk_ids)
    return y, topk_ids


def check(path, layer, *, layout="canonical", quant="a16w4", tokens=4, seed=0, log=print) -> dict:
    """Load, run and compare; the numbers the example prints, as a dict."""
    weights, router_w, router_b, top_k, limit, seconds, peak_extra = load_block(path, layer, layout=layout)
    packed = _canonical_bytes(weights)
    log(f"loaded {weights} in {seconds:.1f} s")
    log(f"peak host memory while loading: {peak_extra / 1e9:.3f} GB above the resident set before, "
        f"{peak_extra / packed:.2f}x the layer's packed size ({packed / 1e9:.3f} GB)")
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((tokens, weights.hidden)), jnp.bfloat16)
    y, ids = run_block(x, weights, router_w, router_b, top_k=top_k, limit=limit, quant=quant)
    ckpt = checkpoints.Checkpoint(path)
    prefix = checkpoints.GPT_OSS_PREFIX.format(layer=layer)

    def read_expert(e):
        return {n: ckpt.read(prefix + n, e) for n in (
            "gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
            "down_proj_blocks", "down_proj_scales", "down_proj_bias")}

    want, want_ids = gpt_oss_moe_block(x, router_w, router_b, read_expert, top_k=top_k, limit=limit)
    got = np.asarray(y, np.float64)
    want = np.asarray(want, np.float64)
    rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    cos = float(np.sum(got * want) / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    same_ids = bool(np.array_equal(np.sort(np.asarray(ids), 1), np.sort(np.asarray(want_ids), 1)))
    ok = same_ids and (rel <= REL_BOUND if quant == "a16w4" else cos >= COSINE_FLOOR[quant])
    bound = f"bound {REL_BOUND}" if quant == "a16w4" else f"cosine {cos:.5f}, floor {COSINE_FLOOR[quant]}"
    log(f"layer {layer}, T={tokens}, {quant}: against the model definition: relative Frobenius error "
        f"{rel:.2e} ({bound}), same experts {same_ids}: {'ok' if ok else 'FAILED'}")
    return dict(ok=ok, rel=rel, cosine=cos, same_ids=same_ids, peak_extra_bytes=peak_extra,
                packed_bytes=packed, load_seconds=seconds, weights=weights)


def _canonical_bytes(w) -> int:
    E, H, I = w.num_experts, w.hidden, w.intermediate
    return E * (2 * I * H // 2 + 2 * I * H // 32 + H * I // 2 + H * I // 32 + 4 * (2 * I + H))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="gpt-oss checkpoint directory (with model.safetensors.index.json)")
    src.add_argument("--synthetic", choices=["gpt-oss-120b", "gpt-oss-20b", "tiny"],
                     help="write a one-layer synthetic checkpoint of this size first")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--layout", default="canonical", choices=["canonical", "sm90", "gfx950"])
    ap.add_argument("--quant", default="a16w4", choices=list(mm.QUANT_MODES))
    ap.add_argument("--tokens", type=int, default=4)
    a = ap.parse_args(argv)
    if a.checkpoint:
        res = check(a.checkpoint, a.layer, layout=a.layout, quant=a.quant, tokens=a.tokens)
    else:
        p = mm.spec.PRESETS[a.synthetic] if a.synthetic != "tiny" else mm.LayerSpec(8, 4, 256, 128)
        with tempfile.TemporaryDirectory() as d:
            # written in a child process: its memory is not this process's peak
            from jax_mxfp4_moe.tools.synthetic_checkpoint import write_gpt_oss
            t0 = time.perf_counter()
            proc = multiprocessing.get_context("spawn").Process(
                target=write_gpt_oss, args=(d,), kwargs=dict(
                    num_layers=a.layer + 1, num_experts=p.num_experts, hidden=p.hidden,
                    intermediate=p.intermediate, top_k=p.top_k, shards=2))
            proc.start()
            proc.join()
            if proc.exitcode:
                print(f"writing the synthetic checkpoint failed (exit {proc.exitcode})", file=sys.stderr)
                return 2
            print(f"wrote a synthetic {a.synthetic} checkpoint ({a.layer + 1} layer(s), 2 shards) "
                  f"in {time.perf_counter() - t0:.1f} s")
            res = check(d, a.layer, layout=a.layout, quant=a.quant, tokens=a.tokens)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
