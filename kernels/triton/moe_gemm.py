"""MoE expert GEMMs over sorted rows, MXFP4 weights upcast in-kernel.

Both kernels walk BM-row blocks of the sort contract (DESIGN §3): program
(n, m[, k]) handles rows [m*BM, (m+1)*BM) of the sorted order, whose expert is
sorted_expert_ids[m]; blocks at or past num_valid[0] return at once.
DIRECT (decode: at most NMAX (token, slot) entries) skips the sort: every
program derives its block from topk_ids itself (_direct_rows), the same
blocks the contract would give; the sid/sw pointers then hold topk_ids and
topk_weights, flat.
Weights are MXFP4 [E, N, K/2] (element 2i in the low nibble) with E8M0 scales
[E, N, K/32], upcast to bf16 in-kernel for the tensor cores.

Activation formats (A_FMT / OUT_FMT): 0 = bf16, 1 = MXFP4, 2 = MXFP8. The MX
modes quantise with the formats rule and keep the exact dequantised values in
bf16 (Hopper has no fp4 tensor-core op, so the dot runs on bf16 either way).

SWAP selects the operand order:
  0: A @ W^T, tokens on the MMA's M side (tl.dot_scaled upcasts W): prefill.
  1: W @ A^T, weight rows on the M side, so the token block BM can be 16
     (tl.dot_scaled upcasts W).
  2: as 1, with W upcast by e2m1_even_odd: an elementwise bit-twiddle of the
     packed bytes (no reshuffle of the upcast values through shared memory),
     multiplied against x's even and odd columns in two dots: decode.
"""

import triton
import triton.language as tl

from .mx import mx_fake_quant


@triton.jit
def _block_rows(sid_ptr, sexp_ptr, nv_ptr, T, BM: tl.constexpr):
    m = tl.program_id(1)
    rows = m * BM + tl.arange(0, BM)
    packed = tl.load(sid_ptr + rows)
    tok = packed & 0xFFFFFF
    slot = packed >> 24
    expert = tl.load(sexp_ptr + m)
    return rows, tok, slot, tok < T, expert


@triton.jit
def _direct_rows(ids_ptr, tw_ptr, T, K, E, BM: tl.constexpr, NMAX: tl.constexpr):
    """Block program_id(1) of the sort contract, computed from topk_ids (its
    n = T*K <= NMAX entries): experts in order of first appearance, each
    expert's entries in (token, slot) order, ceil(count / BM) blocks each.
    Returns rows, tok, slot, row_ok, expert, weight of each row, and the
    number of blocks in use."""
    n = T * K
    i = tl.arange(0, NMAX)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    ok = (i < n) & (e >= 0) & (e < E)
    same = (e[:, None] == e[None, :]) & ok[:, None] & ok[None, :]
    dup = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), 1)  # rank in its expert
    first = ok & (dup == 0)
    nblk = tl.where(first, (tl.sum(same.to(tl.int32), 1) + BM - 1) // BM, 0)
    start = tl.cumsum(nblk, 0) - nblk  # first block of each expert (at its first entry)
    blk = tl.sum(tl.where(same & first[None, :], start[None, :], 0), 1) + dup // BM
    m = tl.program_id(1)
    r = tl.arange(0, BM)
    sel = (ok & (blk == m))[None, :] & ((dup % BM)[None, :] == r[:, None])  # [BM, NMAX]
    row_ok = tl.sum(sel.to(tl.int32), 1) > 0
    tok = tl.sum(tl.where(sel, i[None, :] // K, 0), 1)
    slot = tl.sum(tl.where(sel, i[None, :] % K, 0), 1)
    wgt = tl.sum(tl.where(sel, tl.load(tw_ptr + i, mask=i < n, other=0.0)[None, :], 0.0), 1)
    expert = tl.sum(tl.where(ok & (blk == m) & (dup % BM == 0), e, 0), 0)
    return m * BM + r, tl.where(row_ok, tok, T), slot, row_ok, expert, wgt, tl.sum(nblk, 0)


@triton.jit
def _zero(ptr, n, BLOCK: tl.constexpr):
    """Zero ptr[0:n), split over the programs of axis 0 (those with m = s = 0)."""
    share = tl.cdiv(tl.cdiv(n, tl.num_programs(0)), BLOCK) * BLOCK
    lo = tl.program_id(0) * share
    for b in range(lo, tl.minimum(lo + share, n), BLOCK):
        offs = b + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < n)


def _e2m1_high_nibbles_asm(src: str, selector: str, out: str) -> str:
    """PTX: the high nibbles of two bytes of `src` -> bf16x2 register `out`.
    prmt puts byte i in a half's low byte and its sign-replicated copy
    (selector nibble | 8) in the high byte: after << 2 the nibble's magnitude
    sits at bits 6-8 and bit 15 is its sign, so one mask leaves the bf16 bits."""
    return (f"prmt.b32 t, {src}, 0, {selector};\nshl.b32 t, t, 2;\n"
            f"and.b32 {out}, t, 0x81c081c0;\nmul.rn.bf16x2 {out}, {out}, bias;")


# The bf16 bits of an E2M1 code n are (n & 8) << 12 | (n & 7) << 6 = its value
# * 2**-126 (E2M1's subnormal 0.5 lands on a bf16 subnormal, exactly); one
# bf16x2 multiply by 2**126 (0x7e80) makes it the value. Odd elements are the
# high nibbles of bytes 0, 1 (selector 0x9180), then 2, 3 (0xb3a2); even ones
# are the high nibbles of the word shifted left by 4 (byte i keeps its place).
E2M1_EVEN_ODD_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .b32 t, lo, bias;\nmov.b32 bias, 0x7e807e80;\nshl.b32 lo, $4, 4;\n"
    + "\n".join(_e2m1_high_nibbles_asm(src, sel, out) for src, sel, out in (
        ("lo", "0x9180", "$0"), ("lo", "0xb3a2", "$1"), ("$4", "0x9180", "$2"),
        ("$4", "0xb3a2", "$3"))) + "\n}")


@triton.jit
def e2m1_even_odd(w):
    """Packed E2M1 [R, C] (uint8, element 2i in the low nibble) -> (even, odd)
    elements as bf16 [R, C] each, exact. Elementwise (same shape in and out),
    so triton can load the bytes straight into the MMA operand layout."""
    return tl.inline_asm_elementwise(
        asm=E2M1_EVEN_ODD_ASM, constraints="=r,=r,=r,=r,r",
        args=[w], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


# Scale bytes 0, 1 of a word to the halves' exponent fields, then bytes 2, 3.
E8M0_BF16_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .b32 t;\n"
    "prmt.b32 t, $2, 0, 0x5140;\nshl.b32 $0, t, 7;\n"
    "prmt.b32 t, $2, 0, 0x7362;\nshl.b32 $1, t, 7;\n}")


@triton.jit
def e8m0_bf16(ws):
    """E8M0 scale bytes -> 2**(byte - 127) as bf16 (the exponent field is the
    byte). Two departures from the reference, for bytes no real weights use:
    255 (NaN) gives +inf, so the block's elements become +-inf (0 * inf: NaN)
    rather than NaN; 0 gives 0 rather than 2**-127, flushing elements of
    magnitude <= 6 * 2**-127 to zero (an all-zero block, byte 0, is exact)."""
    return tl.inline_asm_elementwise(
        asm=E8M0_BF16_ASM, constraints="=r,=r,r", args=[ws], dtype=tl.bfloat16,
        is_pure=True, pack=4)


@triton.jit
def _mx_dot_even_odd(acc, xe, xo, w, ws):
    """acc += upcast(w, ws) @ [xe | xo] over interleaved K: W as the MMA's A
    operand, its even and odd elements against x's even and odd columns."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    even, odd = e2m1_even_odd(w)
    s = e8m0_bf16(ws)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (R, C // 16, 16)), (R, C))
    acc = tl.dot(even * s, tl.trans(xe), acc)
    acc = tl.dot(odd * s, tl.trans(xo), acc)
    return acc


@triton.jit
def _mx_dot(acc, a, w, ws, SWAP: tl.constexpr):
    """acc += a @ upcast(w, ws)^T, or its transpose when SWAP."""
    if SWAP:
        # Passing acc here trips a shape check in triton 3.9 (it swaps the
        # operands of an e2m1-lhs dot internally): add the product instead.
        acc = acc + tl.dot_scaled(w, ws, "e2m1", tl.trans(a), None, "bf16")
    else:
        acc = tl.dot_scaled(a, None, "bf16", tl.trans(w), ws, "e2m1", acc)
    return acc


@triton.jit
def _load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, w_row_ok, k0, k_hi, K,
                BK: tl.constexpr):
    """A [BM, BK], packed W [BN, BK/2] and scales [BN, BK/32] of one K step
    (all masked off past k_hi: nothing is read there)."""
    kk = k0 + tl.arange(0, BK)
    a = tl.load(a_ptr + a_row_off[:, None] + kk[None, :],
                mask=a_row_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
    kp = k0 // 2 + tl.arange(0, BK // 2)
    w = tl.load(w_ptr + w_row[:, None] * (K // 2) + kp[None, :],
                mask=w_row_ok[:, None] & (kp < k_hi // 2)[None, :], other=0)
    ks = k0 // 32 + tl.arange(0, BK // 32)
    ws = tl.load(ws_ptr + w_row[:, None] * (K // 32) + ks[None, :],
                 mask=w_row_ok[:, None] & (ks < k_hi // 32)[None, :], other=0)
    return a, w, ws


@triton.jit
def _gemm_loop(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, w_row_ok, k_lo, k_hi, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               A_FMT: tl.constexpr, SWAP: tl.constexpr):
    """Sum over k in [k_lo, k_hi) of A[rows, k] * W[w_row, k] -> [BM, BN].

    A plain loop, so that triton's pipeliner (num_stages) turns the loads into
    cp.async copies several steps ahead; it can only because every pointer
    and K are compiled as 16-byte aligned (cuda_kernels)."""
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        a, w, ws = _load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, w_row_ok,
                               k0, k_hi, K, BK)
        if A_FMT == 0:
            a = a.to(tl.bfloat16)
        else:
            a = mx_fake_quant(a.to(tl.float32), BM, BK, A_FMT == 2).to(tl.bfloat16)
        if SWAP == 2:
            xe, xo = tl.split(tl.reshape(a, (BM, BK // 2, 2)))
            acc = _mx_dot_even_odd(acc, xe, xo, w, ws)
        else:
            acc = _mx_dot(acc, a, w, ws, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    return acc


@triton.jit
def moe_gemm1(x_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sexp_ptr, nv_ptr, out_ptr,
              part_ptr, y_ptr, y_len, T, H, I, E, TOPK, swiglu_alpha, swiglu_limit,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
              INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
              SWAP: tl.constexpr, SPLIT_K: tl.constexpr,
              DIRECT: tl.constexpr, NMAX: tl.constexpr, ZERO_Y: tl.constexpr):
    """out[r, n] = act(x[tok(r)] @ W1[e, (gate|up)(n)]^T + b1) for BN columns n
    of the intermediate; ACT 0 = silu, 1 = swiglu_oai. out is [P, I] bf16.

    SPLIT_K > 1 (decode: too few CTAs to keep the weights streaming): program
    (n, m, s) sums H-slice s only and adds it into part [launched rows, 2I]
    f32; the last of the SPLIT_K programs of a tile to arrive (one int32
    counter per tile, stored after part's rows) applies the epilogue. part and
    the counters start at 0.

    ZERO_Y: the programs (n, 0, 0) first zero y_ptr[0:y_len) (f32), gemm2's
    accumulator and counters, which saves the stream a memset."""
    if ZERO_Y:
        if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            _zero(y_ptr, y_len, 1024)
    if DIRECT:
        rows, tok, slot, row_ok, expert, _, live = _direct_rows(sid_ptr, sid_ptr, T, TOPK, E,
                                                                BM, NMAX)
        if tl.program_id(1) >= live:
            return
    else:
        if tl.program_id(1) * BM >= tl.load(nv_ptr):
            return
        rows, tok, slot, row_ok, expert = _block_rows(sid_ptr, sexp_ptr, nv_ptr, T, BM)
    e = expert.to(tl.int64)
    # Accumulator column j holds gate (j even) or up (j odd) of n = n0 + j // 2.
    j = tl.arange(0, 2 * BN)
    n = tl.program_id(0) * BN + j // 2
    up = j % 2
    if INTERLEAVED:
        w_row = 2 * n + up
    else:
        w_row = n + up * I
    w_row_ok = n < I
    k_len = tl.cdiv(tl.cdiv(H, BK), SPLIT_K) * BK
    k_lo = tl.program_id(2) * k_len
    acc = _gemm_loop(x_ptr, tok * H, row_ok,
                     w_ptr + e * (2 * I) * (H // 2), ws_ptr + e * (2 * I) * (H // 32),
                     w_row, w_row_ok, k_lo, tl.minimum(k_lo + k_len, H), H,
                     BM, 2 * BN, BK, A_FMT, SWAP)
    if SPLIT_K > 1:
        part = part_ptr + rows[:, None] * (2 * I) + (tl.program_id(0) * 2 * BN + j)[None, :]
        ok = row_ok[:, None] & w_row_ok[None, :]
        tl.atomic_add(part, acc, mask=ok, sem="relaxed")
        # Every thread's partial sums are in before the tile's counter moves
        # (release); the last program reads them all back (acquire).
        tl.debug_barrier()
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        count_ptr = (part_ptr + tl.num_programs(1) * BM * 2 * I).to(tl.pointer_type(tl.int32))
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") != SPLIT_K - 1:
            return
        acc = tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * (2 * I) + w_row, mask=w_row_ok, other=0.0)[None, :]
    g, u = tl.split(tl.reshape(acc, (BM, BN, 2)))
    if ACT == 0:
        h = g / (1.0 + tl.exp(-g)) * u
    else:
        # where() rather than min/clamp so that NaN propagates.
        g = tl.where(g > swiglu_limit, swiglu_limit, g)
        u = tl.where(u > swiglu_limit, swiglu_limit, u)
        u = tl.where(u < -swiglu_limit, -swiglu_limit, u)
        h = g / (1.0 + tl.exp(-swiglu_alpha * g)) * (u + 1.0)
    if OUT_FMT != 0:
        h = mx_fake_quant(h, BM, BN, OUT_FMT == 2)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    tl.store(out_ptr + rows[:, None] * I + cols[None, :], h.to(tl.bfloat16),
             mask=row_ok[:, None] & (cols < I)[None, :])


@triton.jit
def _store_cast(y_ptr, out_ptr, T, H, BN: tl.constexpr, CAST_T: tl.constexpr):
    """out[:, tile] = y[:, tile] in out's dtype, for column tile program_id(0)."""
    t = tl.arange(0, CAST_T)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    offs = t[:, None] * H + cols[None, :]
    m = (t < T)[:, None] & (cols < H)[None, :]
    v = tl.load(y_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def moe_gemm2(inter_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, y_ptr,
              out_ptr, T, H, I, E, TOPK,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
              DETERMINISTIC: tl.constexpr, SWAP: tl.constexpr,
              DIRECT: tl.constexpr, NMAX: tl.constexpr, CAST_T: tl.constexpr):
    """sorted_weight(r) * (inter[r] @ W2[e, n]^T + b2[e, n]) for BN columns n of
    H, added into y [T, H] f32 with atomics, or (DETERMINISTIC, SPLIT_K == 1)
    stored into y [T, TOPK, H] f32 at (token, slot).

    CAST_T > 0 (DIRECT, atomics, T <= CAST_T): the last program to add into a
    column tile (one int32 counter per tile, stored after y's T*H values)
    writes y[:, tile] to out in out's dtype, so no separate cast follows."""
    if DIRECT:
        rows, tok, slot, row_ok, expert, wgt, live = _direct_rows(sid_ptr, sw_ptr, T, TOPK, E,
                                                                  BM, NMAX)
        if tl.program_id(1) >= live:
            if CAST_T > 0:
                if (live == 0) & (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
                    _store_cast(y_ptr, out_ptr, T, H, BN, CAST_T)  # no entry: y stays 0
            return
    else:
        if tl.program_id(1) * BM >= tl.load(nv_ptr):
            return
        rows, tok, slot, row_ok, expert = _block_rows(sid_ptr, sexp_ptr, nv_ptr, T, BM)
        wgt = tl.load(sw_ptr + rows)
    e = expert.to(tl.int64)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < H
    k_len = tl.cdiv(tl.cdiv(I, BK), SPLIT_K) * BK
    k_lo = tl.program_id(2) * k_len
    k_hi = tl.minimum(k_lo + k_len, I)
    acc = _gemm_loop(inter_ptr, rows * I, row_ok,
                     w_ptr + e * H * (I // 2), ws_ptr + e * H * (I // 32),
                     cols, col_ok, k_lo, k_hi, I, BM, BN, BK, 0, SWAP)
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(b_ptr + e * H + cols, mask=col_ok, other=0.0)[None, :]
    acc *= wgt[:, None]
    ok = row_ok[:, None] & col_ok[None, :]
    if DETERMINISTIC:
        tl.store(y_ptr + (tok * TOPK + slot)[:, None] * H + cols[None, :], acc, mask=ok)
    else:
        tl.atomic_add(y_ptr + tok[:, None] * H + cols[None, :], acc, mask=ok, sem="relaxed")
        if CAST_T > 0:
            # As in gemm1's split-K: all of this program's adds are in before
            # its arrival is counted (release); the last one reads them all.
            tl.debug_barrier()
            count_ptr = (y_ptr + T * H).to(tl.pointer_type(tl.int32))
            if tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == live * SPLIT_K - 1:
                _store_cast(y_ptr, out_ptr, T, H, BN, CAST_T)
