"""Derivatives of the ``moe`` primitive, by JVP and transpose rules (no custom_vjp).

The MXFP4 experts are frozen: the weight arrays are integer data (their
tangents are float0) and gradients flow to x, topk_weights, b1, b2 and,
through x, to everything upstream.  The layer is linear in each of those
pieces once the others are fixed, so its JVP is written with linear
primitives and jnp:

- ``gmm_p``, the grouped matmul through MXFP4 weights: rows in blocks of
  ``block_m`` (the sort contract's layout), block b through expert
  ``block_expert[b]`` (-1: zeros).  It is linear in its rows; its transpose is
  the grouped matmul through the transposed weights (``transpose``), whose
  contraction runs over the weight's rows (N), with the E8M0 blocks along the
  output axis.  On CUDA it runs the backend's grouped-matmul kernels.
- ``gather_rows_p``, rows moved between token order [T, ...] and sorted
  order [P, ...]: x into sorted rows, and the per-slot outputs back to
  (token, slot).  Each direction is a gather and the transpose of the other
  (a scatter-add of every row would run as atomics).
- ``act_tangent_p``, the activation's derivative at the pre-activations,
  linear in the tangent: its transpose recomputes the derivative from h.
- the routing-weighted combine y = sum_j topk_weights[:, j] * o[:, j] (linear
  in o and in topk_weights) and the bias rows (a one-hot per row block times
  the bias: its transpose is a sum over each block's rows), in jnp.

The sort (``sort_p``) runs the platform's sort kernels where it has them.
Under differentiation the primal runs as those pieces too, so the forward
keeps what the backward needs instead of recomputing it: the pre-activations
h (the grouped matmul's output, [P, 2I] f32 over the padded sorted rows) and
the per-slot outputs ([T, k, H] f32), about (2I + H) * k * 4 bytes per token;
its values agree with the fused forward within its tolerance (same operands
and rounding, f32 sums in another order).  The quantised modes differentiate
with a straight-through estimator: the tangent of quantise-dequantise is the
identity (the QAT convention); the backward's grouped matmuls take bf16
operands with f32 accumulation.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jax_mxfp4_moe.numerics import formats, sorting
from jax_mxfp4_moe.spec import split_gate_up

gmm_p = Primitive("mxfp4_grouped_matmul")
KERNEL_PLATFORMS = ("cuda",)  # platforms with grouped-matmul kernels (else jnp)


def grad_block_m(tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per block of the differentiated layer's grouped matmuls: about the
    rows an expert gets, 16..128 (the kernels' tile heights)."""
    rows = max(1, tokens * top_k // max(num_experts, 1))
    return min(128, max(16, 1 << (rows - 1).bit_length()))


# ---------------------------------------------------------------------------
# gmm_p: out[r] = lhs[r] @ W[e(r)]^T  (transpose: lhs[r] @ W[e(r)])
# ---------------------------------------------------------------------------


def gmm(lhs, block_expert, w, w_scale, *, which: str, dims: dict, layout: str, block_m: int,
        transpose: bool = False, scale_max=None):
    """The grouped matmul through one weight matrix (``which`` "w1" [2I, H] or
    "w2" [H, I] of an expert, in ``layout``): f32 rows [P, N] (transpose:
    [P, K]) for rows lhs [P, K] ([P, N]), P = len(block_expert) * block_m."""
    return gmm_p.bind(lhs, block_expert, w, w_scale, which=which, layer_dims=tuple(sorted(dims.items())),
                      layout=layout, block_m=int(block_m), transpose=bool(transpose),
                      scale_max=scale_max)


def matrix_shape(which: str, layer_dims) -> tuple[int, int]:
    """(N rows, K columns) of one expert's matrix."""
    d = dict(layer_dims)
    H, I = d["hidden"], d["intermediate"]
    return (2 * I, H) if which == "w1" else (H, I)


def _gmm_abstract(lhs, block_expert, w, w_scale, *, which, layer_dims, layout, block_m, transpose,
                  scale_max):
    n, k = matrix_shape(which, layer_dims)
    want = n if transpose else k
    if lhs.ndim != 2 or lhs.shape[1] != want or lhs.shape[0] != block_expert.shape[0] * block_m:
        raise ValueError(f"lhs: expected [{block_expert.shape[0]} * {block_m}, {want}], got {lhs.shape}")
    return jax.core.ShapedArray((lhs.shape[0], k if transpose else n), jnp.float32)


def _canonical_matrix(w, w_scale, *, which, layer_dims, layout):
    from jax_mxfp4_moe.layer import layouts

    arrays = layouts.get(layout).unpack({which: w, which + "_scale": w_scale}, **dict(layer_dims))
    return arrays[which], arrays[which + "_scale"]


def gmm_jnp(lhs, block_expert, w, w_scale, *, which, layer_dims, layout, block_m, transpose,
            scale_max, platform="cpu"):
    """gmm_p in jnp, operands bf16 (exact for the weights), f32 accumulation.
    On CPU each block's expert matrix is gathered and dequantised in one fused
    gather and the blocks run as one batched matmul (numerics/jnp_layer.py
    says why XLA:CPU should not run ragged_dot); elsewhere the blocks, sorted
    by expert, are the groups of a ragged_dot over every expert's matrix."""
    del scale_max
    wc, sc = _canonical_matrix(w, w_scale, which=which, layer_dims=layer_dims, layout=layout)
    nb = block_expert.shape[0]
    wd = formats.dequantize_mxfp4(wc, sc, jnp.bfloat16)  # [E, N, K]
    a = lhs.astype(jnp.bfloat16)
    if platform != "cpu":
        E = wd.shape[0]
        sizes = jnp.zeros(E + 1, jnp.int32).at[jnp.where(block_expert >= 0, block_expert, E)].add(
            block_m)[:E]
        rhs = wd if transpose else jnp.swapaxes(wd, 1, 2)
        return jax.lax.ragged_dot(a, rhs, sizes, preferred_element_type=jnp.float32)
    wb = wd[jnp.maximum(block_expert, 0)]  # [nb, N, K]: XLA dequantises only these
    out = jnp.einsum("bmn,bnk->bmk" if transpose else "bmk,bnk->bmn", a.reshape(nb, block_m, -1),
                     wb, preferred_element_type=jnp.float32)
    out = jnp.where((block_expert >= 0)[:, None, None], out, 0.0)
    return out.reshape(nb * block_m, -1)


_warned: set = set()


def _gmm_lowering(platform):
    def lower(ctx, *args, **params):
        where = platform or ctx.module_context.platforms[0]
        impl = gmm_jnp
        if where == "cuda":
            from jax_mxfp4_moe.cuda import backend as cuda

            if cuda.unsupported_gmm(params) is None:
                impl = cuda.gmm
        elif where == "rocm" and "rocm" not in _warned:
            _warned.add("rocm")
            warnings.warn("jax_mxfp4_moe: gfx950 has no backward kernels yet; the gradient's "
                          "grouped matmuls run as XLA (jnp) on rocm", stacklevel=2)
        if impl is gmm_jnp:
            impl = functools.partial(gmm_jnp, platform=where)
        return mlir.lower_fun(functools.partial(impl, **params), multiple_results=False)(ctx, *args)
    return lower


gmm_p.def_abstract_eval(_gmm_abstract)
gmm_p.def_impl(lambda *args, **params: jax.jit(functools.partial(gmm_p.bind, **params))(*args))
mlir.register_lowering(gmm_p, _gmm_lowering(None))
mlir.register_lowering(gmm_p, _gmm_lowering("cuda"), platform="cuda")


def _gmm_jvp(primals, tangents, **params):
    dlhs = tangents[0]
    y = gmm_p.bind(*primals, **params)
    if type(dlhs) is ad.Zero:
        return y, ad.Zero.from_primal_value(y)
    return y, gmm_p.bind(dlhs, *primals[1:], **params)


def _gmm_transpose(ct, lhs, block_expert, w, w_scale, **params):
    assert ad.is_undefined_primal(lhs) and not ad.is_undefined_primal(w)
    if type(ct) is ad.Zero:
        return [ad.Zero(lhs.aval), None, None, None]
    back = gmm_p.bind(ct, block_expert, w, w_scale, **dict(params, transpose=not params["transpose"]))
    return [back.astype(lhs.aval.dtype), None, None, None]


def _gmm_batch(args, dims, **params):
    lhs, be, w, ws = args
    ld, bd, wd, sd = dims
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if wd is None and sd is None:
        # Fold the batch into the blocks: [B, P, K] rows with [B, NB] experts.
        lhs = jnp.moveaxis(lhs, ld, 0) if ld is not None else jnp.broadcast_to(lhs, (size, *lhs.shape))
        be = jnp.moveaxis(be, bd, 0) if bd is not None else jnp.broadcast_to(be, (size, *be.shape))
        out = gmm_p.bind(lhs.reshape(-1, lhs.shape[-1]), be.reshape(-1), w, ws, **params)
        return out.reshape(size, -1, out.shape[-1]), 0
    front = [jnp.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args, dims)]
    mapped = [d is not None for d in dims]

    def one(batched):
        it = iter(batched)
        return gmm_p.bind(*[next(it) if m else a for a, m in zip(front, mapped)], **params)

    return jax.lax.map(one, [a for a, m in zip(front, mapped) if m]), 0


ad.primitive_jvps[gmm_p] = _gmm_jvp
ad.primitive_transposes[gmm_p] = _gmm_transpose
batching.primitive_batchers[gmm_p] = _gmm_batch


# ---------------------------------------------------------------------------
# sort_p: the sort contract, by the platform's sort kernels where it has them
# ---------------------------------------------------------------------------

sort_p = Primitive("mxfp4_moe_sort")
sort_p.multiple_results = True


def sort(topk_ids, expert_mask, *, num_experts: int, block_m: int):
    """(sorted_token_ids, sorted_expert_ids, num_valid) of sorting.moe_sort:
    on CUDA by the backend's sort kernels (as the fused layer sorts), else
    jnp (whose searchsorted loop XLA runs as a while loop of small kernels)."""
    mask = () if expert_mask is None else (jnp.asarray(expert_mask).astype(jnp.int32),)
    return sort_p.bind(topk_ids.astype(jnp.int32), *mask, num_experts=num_experts,
                       block_m=block_m)


def _sort_jnp(ids, *mask, num_experts, block_m, backend=None):
    s = sorting.moe_sort if backend is None else backend.sort
    r = s(ids, jnp.zeros(ids.shape, jnp.float32), num_experts=num_experts, block_m=block_m,
          expert_mask=mask[0] if mask else None)
    return [r.sorted_token_ids, r.sorted_expert_ids, r.num_valid]


def _sort_abstract(ids, *mask, num_experts, block_m):
    T, k = ids.shape
    i32 = jnp.int32
    return [jax.core.ShapedArray((sorting.sorted_size(T, k, num_experts, block_m),), i32),
            jax.core.ShapedArray((sorting.num_blocks(T, k, num_experts, block_m),), i32),
            jax.core.ShapedArray((2,), i32)]


def _sort_lowering(platform):
    def lower(ctx, *args, **params):
        backend = None
        if (platform or ctx.module_context.platforms[0]) == "cuda":
            from jax_mxfp4_moe.cuda import backend as cuda
            if cuda.unsupported_sort(params["block_m"]) is None:
                backend = cuda
        return mlir.lower_fun(functools.partial(_sort_jnp, backend=backend, **params),
                              multiple_results=True)(ctx, *args)
    return lower


def _sort_jvp(primals, tangents, **params):
    out = sort_p.bind(*primals, **params)
    return out, [ad.Zero.from_primal_value(o) for o in out]


def _sort_batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
            for a, d in zip(args, dims)]
    return jax.vmap(functools.partial(_sort_jnp, **params))(*args), [0, 0, 0]


sort_p.def_abstract_eval(_sort_abstract)
sort_p.def_impl(lambda *args, **params: jax.jit(functools.partial(sort_p.bind, **params))(*args))
mlir.register_lowering(sort_p, _sort_lowering(None))
mlir.register_lowering(sort_p, _sort_lowering("cuda"), platform="cuda")
ad.primitive_jvps[sort_p] = _sort_jvp
batching.primitive_batchers[sort_p] = _sort_batch


# ---------------------------------------------------------------------------
# gather_rows_p: rows of an array by index, whose transpose is a gather too
# ---------------------------------------------------------------------------

gather_rows_p = Primitive("mxfp4_moe_gather_rows")


def gather_rows(v, index, back_index):
    """out[i] = sum over m of v[index[i, m]] (indices >= len(v): nothing),
    linear in v. ``back_index`` [len(v), M'] lists, for each row j of v, the
    rows i with j among index[i] (padded with indices >= len(out)), so that
    the transpose is gather_rows(ct, back_index, index): a gather (and a sum
    over M') rather than a scatter-add. The layer moves rows between token
    order [T, ...] and sorted order [P, ...] with it, both ways."""
    return gather_rows_p.bind(v, index, back_index)


def _gather_rows_jnp(v, index, back_index):
    del back_index
    return jnp.take(v, index, axis=0, mode="fill", fill_value=0).sum(axis=1, dtype=v.dtype)


def _gather_rows_abstract(v, index, back_index):
    return jax.core.ShapedArray((index.shape[0], *v.shape[1:]), v.dtype)


def _gather_rows_transpose(ct, v, index, back_index):
    assert ad.is_undefined_primal(v) and not ad.is_undefined_primal(index)
    if type(ct) is ad.Zero:
        return [ad.Zero(v.aval), None, None]
    return [gather_rows_p.bind(ct, back_index, index), None, None]


def _gather_rows_batch(args, dims):
    v, index, back = args
    vd, idd, bd = dims
    if idd is None and bd is None:  # the batch rides along as v's last axis
        out = gather_rows_p.bind(jnp.moveaxis(v, vd, -1), index, back)
        return out, out.ndim - 1
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    v, index, back = (jnp.moveaxis(a, d, 0) if d is not None else
                      jnp.broadcast_to(a, (size, *a.shape)) for a, d in zip(args, dims))
    return jax.vmap(_gather_rows_jnp)(v, index, back), 0


gather_rows_p.def_abstract_eval(_gather_rows_abstract)
gather_rows_p.def_impl(lambda *args: jax.jit(_gather_rows_jnp)(*args))
mlir.register_lowering(gather_rows_p, mlir.lower_fun(_gather_rows_jnp, multiple_results=False))
def _gather_rows_jvp(primals, tangents):
    y = gather_rows_p.bind(*primals)
    if type(tangents[0]) is ad.Zero:
        return y, ad.Zero.from_primal_value(y)
    return y, gather_rows_p.bind(tangents[0], *primals[1:])


ad.primitive_jvps[gather_rows_p] = _gather_rows_jvp
ad.primitive_transposes[gather_rows_p] = _gather_rows_transpose
batching.primitive_batchers[gather_rows_p] = _gather_rows_batch


# ---------------------------------------------------------------------------
# act_tangent_p: the activation's derivative, linear in the tangent
# ---------------------------------------------------------------------------

act_tangent_p = Primitive("mxfp4_moe_activation_tangent")


def _preactivation(h, b, block_expert, block_m):
    """h [P, 2I] plus each block's expert's bias b [E, 2I] (None: none)."""
    return h if b is None else h + _block_bias(b, block_expert, block_m)


def _act_tangent_jnp(dh, h, *b_be, activation, gate_up, block_m):
    """da = act'(h + bias) dh: jax.jvp of the spec's jnp definition."""
    from jax_mxfp4_moe.numerics import jnp_layer

    hb = _preactivation(h, *(b_be or (None, None)), block_m)
    return jax.jvp(lambda v: jnp_layer.activation_fn(v, activation, gate_up), (hb,), (dh,))[1]


def act_tangent(dh, h, b, block_expert, *, activation, gate_up, block_m):
    """The activation's tangent at pre-activations h + bias (b [E, 2I] or
    None, per block_expert): linear in dh. Its transpose recomputes the
    derivative from h (one pass over h and the cotangent), so the forward
    keeps h, which the grouped matmul wrote, and no derivative terms."""
    extra = () if b is None else (b, block_expert)
    return act_tangent_p.bind(dh, h, *extra, activation=activation, gate_up=gate_up,
                              block_m=block_m)


def _act_tangent_abstract(dh, h, *b_be, activation, gate_up, block_m):
    return jax.core.ShapedArray((*h.shape[:-1], h.shape[-1] // 2), jnp.float32)


def _act_tangent_transpose(ct, dh, h, *b_be, activation, gate_up, block_m):
    """dh = act'(h + bias)^T ct, gate and up derivatives put back in place by
    a stack (interleaved) or a concatenation (separated), so that XLA writes
    dh in one pass from h and ct."""
    assert ad.is_undefined_primal(dh) and not ad.is_undefined_primal(h)
    rest = [None] * (1 + len(b_be))
    if type(ct) is ad.Zero:
        return [ad.Zero(dh.aval)] + rest
    hb = _preactivation(h, *(b_be or (None, None)), block_m)
    g, u = split_gate_up(hb, gate_up)
    _, pullback = jax.vjp(activation, g, u)
    dg, du = pullback(ct.astype(jnp.float32))
    if gate_up == "interleaved":
        out = jnp.stack([dg, du], axis=-1).reshape(hb.shape)
    else:
        out = jnp.concatenate([dg, du], axis=-1)
    return [out.astype(dh.aval.dtype)] + rest


def _act_tangent_jvp(primals, tangents, **params):
    """Linear in dh; in h and b (second order) the derivative of its jnp definition."""
    floats = 2 if len(primals) == 2 else 3  # dh, h[, b]; then block_expert
    f = lambda *v: _act_tangent_jnp(*v, *primals[floats:], **params)  # noqa: E731
    return jax.jvp(f, tuple(primals[:floats]),
                   tuple(ad.instantiate_zeros(t) for t in tangents[:floats]))


def _act_tangent_batch(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
            for a, d in zip(args, dims)]
    return jax.vmap(functools.partial(_act_tangent_jnp, **params))(*args), 0


act_tangent_p.def_abstract_eval(_act_tangent_abstract)
act_tangent_p.def_impl(lambda *args, **params: jax.jit(functools.partial(_act_tangent_jnp, **params))(*args))
mlir.register_lowering(act_tangent_p, lambda ctx, *args, **params: mlir.lower_fun(
    functools.partial(_act_tangent_jnp, **params), multiple_results=False)(ctx, *args))
ad.primitive_jvps[act_tangent_p] = _act_tangent_jvp
ad.primitive_transposes[act_tangent_p] = _act_tangent_transpose
batching.primitive_batchers[act_tangent_p] = _act_tangent_batch


# ---------------------------------------------------------------------------
# The layer's JVP
# ---------------------------------------------------------------------------


def _zero_or(t):
    return None if type(t) is ad.Zero else t


def _ste(v, quant):
    """The mode's quantise-dequantise of v (float32): the value; its tangent is
    the identity (straight-through), written as such in moe_jvp."""
    from jax_mxfp4_moe.numerics import jnp_layer

    return jnp_layer.quantize_dequantize(v, quant)


def _fit(a, n, fill):
    """a's first n entries, padded with ``fill`` where it is shorter."""
    return a[:n] if a.shape[0] >= n else jnp.pad(a, (0, n - a.shape[0]), constant_values=fill)


def _block_bias(b, block_expert, block_m):
    """Each row's expert's bias [P, N] from b [E, N] (0 where the block's
    expert is -1): one row per block, as a one-hot [NB, E] times b (exact in
    f32), repeated over the block's rows. Its transpose sums each block's
    rows and multiplies by the one-hot's transpose: no scatter-add over rows."""
    onehot = (block_expert[:, None] == jnp.arange(b.shape[0])[None, :]).astype(b.dtype)
    per_block = jnp.dot(onehot, b, precision=jax.lax.Precision.HIGHEST)
    nb, n = per_block.shape
    return jnp.broadcast_to(per_block[:, None, :], (nb, block_m, n)).reshape(nb * block_m, n)


def moe_jvp(primals, tangents, *, unpack, spec, has_mask, **params):
    """(y, dy) of the layer: the primal and its tangent in x, topk_weights, b1
    and b2, through gmm_p, gather_rows_p, act_tangent_p and jnp (module docstring)."""
    x, tw, ids, weights, mask = unpack(primals)
    names = ("x", "topk_weights", "topk_ids", "w1", "w1_scale", "w2", "w2_scale")
    names += (("b1",) if spec.has_b1 else ()) + (("b2",) if spec.has_b2 else ())
    tan = dict(zip(names, tangents))
    T, k = ids.shape
    if T == 0:
        y = jnp.zeros(x.shape, x.dtype)
        return y, ad.Zero.from_primal_value(y)
    E = spec.num_experts
    n_sort = E if mask is None else mask.shape[0]
    bm = grad_block_m(T, k, E)
    sorted_ids, sorted_experts, _ = sort(ids, mask, num_experts=n_sort, block_m=bm)
    nb = sorting.max_blocks(T * k, E, bm)  # every block past it is unused
    P = nb * bm
    block_expert = _fit(sorted_experts, nb, -1)
    block_expert = jnp.where(block_expert < E, block_expert, -1)
    token, slot = sorting.unpack_entry(_fit(sorted_ids, P, sorting.padding_entry(T, k)))
    valid = (token < T) & (jnp.repeat(block_expert, bm) >= 0)
    # Each sorted row's token (T: none) and (token, slot) entry (T * k: none),
    # and each entry's sorted row (P: none): the two directions of gather_rows.
    tok = jnp.where(valid, token, T)[:, None]
    entry = jnp.where(valid, token * k + slot, T * k)
    row_of_entry = jnp.full((T * k,), P, jnp.int32).at[entry].set(
        jnp.arange(P, dtype=jnp.int32), mode="drop")
    dims = dict(num_experts=E, hidden=spec.hidden, intermediate=spec.intermediate)
    mm = functools.partial(gmm, dims=dims, layout=weights.layout, block_m=bm,
                           scale_max=weights.scale_max)
    w = weights

    def rows(v):  # [T, H] -> sorted rows [P, H] (rows of no token 0)
        return gather_rows(v, tok, row_of_entry.reshape(T, k))

    def per_slot(o):  # sorted rows [P, H] -> [T, k, H] (entries of no row 0)
        return gather_rows(o, row_of_entry[:, None], entry[:, None]).reshape(T, k, -1)

    def combine(t, o_slots):  # sum over slots, in slot order
        y = t[:, 0, None] * o_slots[:, 0]
        for j in range(1, k):
            y = y + t[:, j, None] * o_slots[:, j]
        return y

    def bias(b):
        return _block_bias(b, block_expert, bm)

    act_tan = functools.partial(act_tangent, b=w.b1, block_expert=block_expert,
                                activation=spec.activation, gate_up=spec.gate_up, block_m=bm)

    # primal: the grouped matmul's h is what the tangent keeps (act_tangent)
    h = mm(rows(_ste(x, spec.mode)), block_expert, w.w1, w.w1_scale, which="w1")
    a = _act(_preactivation(h, w.b1, block_expert, bm), spec)
    o = mm(_ste(a, spec.mode), block_expert, w.w2, w.w2_scale, which="w2")
    o_slots = per_slot(o if w.b2 is None else o + bias(w.b2))
    tw32 = tw.astype(jnp.float32)
    y = combine(tw32, o_slots).astype(x.dtype)

    # tangent (quantise-dequantise passes tangents through unchanged)
    dx, dtw = _zero_or(tan["x"]), _zero_or(tan["topk_weights"])
    db1 = _zero_or(tan["b1"]) if spec.has_b1 else None
    db2 = _zero_or(tan["b2"]) if spec.has_b2 else None
    do = None
    if dx is not None or db1 is not None:
        dh = 0.0
        if dx is not None:
            dh = mm(rows(dx.astype(jnp.float32)), block_expert, w.w1, w.w1_scale, which="w1")
        if db1 is not None:
            dh = dh + bias(db1)
        do = mm(act_tan(dh, h), block_expert, w.w2, w.w2_scale, which="w2")
    if db2 is not None:
        do = bias(db2) if do is None else do + bias(db2)
    out = None
    if do is not None:
        out = combine(tw32, per_slot(do))
    if dtw is not None:
        d = combine(dtw.astype(jnp.float32), o_slots)
        out = d if out is None else out + d
    if out is None:
        return y, ad.Zero.from_primal_value(y)
    return y, out.astype(y.dtype)


def _act(h, spec):
    from jax_mxfp4_moe.numerics import jnp_layer
    return jnp_layer.activation_fn(h, spec.activation, spec.gate_up)
