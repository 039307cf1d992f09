"""MoE expert GEMMs over sorted rows, MXFP4 weights upcast in-kernel.

Both kernels walk BM-row blocks of the sort contract (docs/DESIGN.md §3): program
(n, m[, k]) handles rows [m*BM, (m+1)*BM) of the sorted order, whose expert is
sorted_expert_ids[m]; blocks at or past num_valid[0] return at once.
DIRECT (decode: at most NMAX (token, slot) entries) skips the sort: every
program derives its block from topk_ids itself (_direct_rows), the same
blocks the contract would give; the sid/sw pointers then hold topk_ids and
topk_weights, flat. moe_decode runs both gemms of such a layer in one launch.
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

from jax_mxfp4_moe.cuda.kernels.mx import mx_fake_quant


@triton.jit
def _block_rows(sid_ptr, sexp_ptr, T, m, used, BM: tl.constexpr):
    """Block m of a sort contract built by the sort kernels. Only rows below
    used = num_valid[0] are read: the last block of the grid may reach past
    sorted_token_ids (P is rarely a multiple of BM), and blocks past used hold
    nothing (their rows read as padding, token T)."""
    rows = m * BM + tl.arange(0, BM)
    packed = tl.load(sid_ptr + rows, mask=rows < used, other=T)
    tok = packed & 0xFFFFFF
    slot = packed >> 24
    expert = tl.load(sexp_ptr + m)
    return rows, tok, slot, tok < T, expert


@triton.jit
def _direct_entries(ids_ptr, tw_ptr, n, NMAX: tl.constexpr):
    """The n <= NMAX routed entries' expert ids (-1 past n) and weights.
    Loaded apart from _direct_block so that a caller can issue both loads
    before other round trips (moe_decode's ticket)."""
    i = tl.arange(0, NMAX)
    e = tl.load(ids_ptr + i, mask=i < n, other=-1)
    w = tl.load(tw_ptr + i, mask=i < n, other=0.0)
    return e, w


@triton.jit
def _direct_block(e, tw, T, K, E, m, BM: tl.constexpr, NMAX: tl.constexpr):
    """Block m of the sort contract, computed from the entries' expert ids e
    and weights tw (_direct_entries; n = T*K <= NMAX of them): experts in
    order of first appearance, each expert's entries in (token, slot) order,
    ceil(count / BM) blocks each. Returns rows, tok, slot, row_ok, expert,
    weight of each row, and the number of blocks in use."""
    n = T * K
    i = tl.arange(0, NMAX)
    ok = (i < n) & (e >= 0) & (e < E)
    # A valid id never equals an invalid one, so `same` needs no ok mask:
    # every use below selects valid entries (ok, first) itself.
    same = e[:, None] == e[None, :]
    dup = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), 1)  # rank in its expert
    first = ok & (dup == 0)
    nblk = tl.where(first, (tl.sum(same.to(tl.int32), 1) + BM - 1) // BM, 0)
    start = tl.cumsum(nblk, 0) - nblk  # first block of each expert (at its first entry)
    blk = tl.sum(tl.where(same & first[None, :], start[None, :], 0), 1) + dup // BM
    r = tl.arange(0, BM)
    sel = (ok & (blk == m))[None, :] & ((dup % BM)[None, :] == r[:, None])  # [BM, NMAX]
    row_ok = tl.sum(sel.to(tl.int32), 1) > 0
    tok = tl.sum(tl.where(sel, i[None, :] // K, 0), 1)
    slot = tl.sum(tl.where(sel, i[None, :] % K, 0), 1)
    wgt = tl.sum(tl.where(sel, tw[None, :], 0.0), 1)
    expert = tl.sum(tl.where(ok & (blk == m) & (dup % BM == 0), e, 0), 0)
    return m * BM + r, tl.where(row_ok, tok, T), slot, row_ok, expert, wgt, tl.sum(nblk, 0)


@triton.jit
def _direct_rows(ids_ptr, tw_ptr, T, K, E, m, BM: tl.constexpr, NMAX: tl.constexpr):
    """_direct_block of block m, loading the entries from topk_ids and
    topk_weights (flat)."""
    e, tw = _direct_entries(ids_ptr, tw_ptr, T * K, NMAX)
    return _direct_block(e, tw, T, K, E, m, BM, NMAX)


@triton.jit
def _route(sid_ptr, sw_ptr, sexp_ptr, nv_ptr, T, TOPK, E, m, BM: tl.constexpr,
           NMAX: tl.constexpr, DIRECT: tl.constexpr, WEIGHTS: tl.constexpr):
    """Block m's rows, from topk_ids (DIRECT: sid/sw hold topk_ids and
    topk_weights, flat) or from the sort contract: rows, tok, slot, row_ok,
    expert, each row's routing weight (0 unless WEIGHTS or DIRECT), and
    whether the block holds entries (programs of empty blocks return)."""
    if DIRECT:
        rows, tok, slot, row_ok, expert, wgt, live = _direct_rows(sid_ptr, sw_ptr, T, TOPK, E, m,
                                                                  BM, NMAX)
        active = m < live
    else:
        used = tl.load(nv_ptr)
        rows, tok, slot, row_ok, expert = _block_rows(sid_ptr, sexp_ptr, T, m, used, BM)
        active = m * BM < used
        if WEIGHTS:
            wgt = tl.load(sw_ptr + rows, mask=rows < used, other=0.0)
        else:
            wgt = tl.zeros((BM,), tl.float32)
    return rows, tok, slot, row_ok, expert, wgt, active


def _e2m1_high_nibbles_asm(src: str, selector: str, out: str, bias: bool) -> str:
    """PTX: the high nibbles of two bytes of `src` -> bf16x2 register `out`.
    prmt puts byte i in a half's low byte and its sign-replicated copy
    (selector nibble | 8) in the high byte: after << 2 the nibble's magnitude
    sits at bits 6-8 and bit 15 is its sign, so one mask leaves the bf16 bits."""
    return (f"prmt.b32 t, {src}, 0, {selector};\nshl.b32 t, t, 2;\n"
            f"and.b32 {out}, t, 0x81c081c0;" + (f"\nmul.rn.bf16x2 {out}, {out}, bias;" if bias else ""))


def _e2m1_even_odd_asm(bias: bool) -> str:
    return ("{ .reg .b32 t, lo, bias;\nmov.b32 bias, 0x7e807e80;\nshl.b32 lo, $4, 4;\n"
            + "\n".join(_e2m1_high_nibbles_asm(src, sel, out, bias) for src, sel, out in (
                ("lo", "0x9180", "$0"), ("lo", "0xb3a2", "$1"), ("$4", "0x9180", "$2"),
                ("$4", "0xb3a2", "$3"))) + "\n}")


# The bf16 bits of an E2M1 code n are (n & 8) << 12 | (n & 7) << 6 = its value
# * 2**-126 (E2M1's subnormal 0.5 lands on a bf16 subnormal, exactly); one
# bf16x2 multiply by 2**126 (0x7e80) makes it the value, unless the scale
# carries that factor (FOLD). Odd elements are the high nibbles of bytes 0, 1
# (selector 0x9180), then 2, 3 (0xb3a2); even ones are the high nibbles of
# the word shifted left by 4 (byte i keeps its place).
E2M1_EVEN_ODD_ASM: tl.constexpr = tl.constexpr(_e2m1_even_odd_asm(bias=True))
E2M1_EVEN_ODD_RAW_ASM: tl.constexpr = tl.constexpr(_e2m1_even_odd_asm(bias=False))


@triton.jit
def e2m1_even_odd(w, RAW: tl.constexpr):
    """Packed E2M1 [R, C] (uint8, element 2i in the low nibble) -> (even, odd)
    elements as bf16 [R, C] each, exact; times 2**-126 when RAW.
    Elementwise (same shape in and out), so triton can load the bytes straight
    into the MMA operand layout."""
    if RAW:
        asm: tl.constexpr = E2M1_EVEN_ODD_RAW_ASM
    else:
        asm: tl.constexpr = E2M1_EVEN_ODD_ASM
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=4)


# Scale bytes 0, 1 of a word to the halves' exponent fields, then bytes 2, 3;
# FOLD adds 126 to each field (2**126 * 2**(byte - 127), normal for bytes <= 128).
def _e8m0_bf16_asm(fold: bool) -> str:
    add = "\nadd.u32 {0}, {0}, 0x3f003f00;" if fold else ""
    return ("{ .reg .b32 t;\n"
            "prmt.b32 t, $2, 0, 0x5140;\nshl.b32 $0, t, 7;" + add.format("$0") + "\n"
            "prmt.b32 t, $2, 0, 0x7362;\nshl.b32 $1, t, 7;" + add.format("$1") + "\n}")


E8M0_BF16_ASM: tl.constexpr = tl.constexpr(_e8m0_bf16_asm(fold=False))
E8M0_BF16_FOLD_ASM: tl.constexpr = tl.constexpr(_e8m0_bf16_asm(fold=True))


@triton.jit
def e8m0_bf16(ws, FOLD: tl.constexpr):
    """E8M0 scale bytes -> 2**(byte - 127) as bf16 (the exponent field is the
    byte), or 2**(byte - 1) when FOLD (bytes <= 128 only, which the caller knows:
    cuda_kernels.FOLD_MAX_SCALE_BYTE). Without FOLD, two
    departures from the reference, for bytes no real weights use: 255 (NaN)
    gives +inf, so the block's elements become +-inf (0 * inf: NaN) rather
    than NaN; 0 gives 0 rather than 2**-127, flushing elements of magnitude
    <= 6 * 2**-127 to zero (an all-zero block, byte 0, is exact). With FOLD
    byte 0 is exact too."""
    if FOLD:
        asm: tl.constexpr = E8M0_BF16_FOLD_ASM
    else:
        asm: tl.constexpr = E8M0_BF16_ASM
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=r,=r,r", args=[ws], dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def _mx_dot_even_odd(acc, xe, xo, w, ws, FOLD: tl.constexpr):
    """acc += upcast(w, ws) @ [xe | xo] over interleaved K: W as the MMA's A
    operand, its even and odd elements against x's even and odd columns.
    FOLD: the 2**126 of the raw E2M1 bits rides on the scale (one bf16x2
    multiply per pair instead of two)."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    even, odd = e2m1_even_odd(w, FOLD)
    s = e8m0_bf16(ws, FOLD)
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


# Weight addressing, of the packed values (ROW_BYTES = VALUE_BYTES per 128 K
# of a row) and of the scales (SCALE_BYTES). Canonical: W [E, N, K/2],
# scales [E, N, K/32]. TILED (the sm90 layout, backends/cuda_layout.py):
# W [E, N/64, K/128, 64, 64] and scales [E, N/64, K/128, 64, 4], zero-padded
# to whole 64 x 128 tiles, so a K step over 64 rows is one contiguous block
# (K steps of at most 128). Canonical row lengths are written (K/32) * (bytes
# per 32 K) so that triton knows the rows' alignment (K is a multiple of 32)
# and copies 16 bytes at a time.
VALUE_BYTES: tl.constexpr = tl.constexpr(64)
SCALE_BYTES: tl.constexpr = tl.constexpr(4)


@triton.jit
def expert_bytes(N, K, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Bytes of one expert's values or scales (N rows of K)."""
    if TILED:
        return tl.cdiv(N, 64) * tl.cdiv(K, 128) * (64 * ROW_BYTES)
    else:
        return N * (K // 32 * (ROW_BYTES // 4))


@triton.jit
def _row_offsets(w_row, K, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Where each W row's values or scales start (TILED: in its first tile)."""
    if TILED:
        return (w_row // 64) * (tl.cdiv(K, 128) * (64 * ROW_BYTES)) + (w_row % 64) * ROW_BYTES
    else:
        return w_row * (K // 32 * (ROW_BYTES // 4))


@triton.jit
def _step_offset(k0, BK: tl.constexpr, ROW_BYTES: tl.constexpr, TILED: tl.constexpr):
    """Where a row's values or scales of the K step at k0 (a multiple of BK)
    start, from the row's start."""
    if TILED:
        tl.static_assert(128 % BK == 0, "the sm90 layout's K steps are at most 128")
        if BK == 128:
            return k0 // 128 * (64 * ROW_BYTES)
        else:
            return k0 // 128 * (64 * ROW_BYTES) + (k0 // BK % (128 // BK)) * (BK * ROW_BYTES // 128)
    else:
        return k0 // (128 // ROW_BYTES)


@triton.jit
def _load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k0, k_hi, K,
                BK: tl.constexpr, EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """A [BM, BK], packed W [BN, BK/2] and scales [BN, BK/32] of one K step.
    A's rows that are not kept are masked off (at decode most of the block:
    their copies are not issued); every W row is in bounds (the callers
    clamp the ones they do not keep), so W and its scales are masked only
    past k_hi, and not at all when K is a multiple of BK (EVEN_K) or in the
    sm90 layout (TILED: past k_hi they read the tiles' padding, zeros)."""
    kk = k0 + tl.arange(0, BK)
    a_ptrs = a_ptr + a_row_off[:, None] + kk[None, :]
    if EVEN_K:
        a = tl.load(a_ptrs, mask=a_row_ok[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=a_row_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
    w = _load_w(w_ptr, w_row, k0, k_hi, K, BK, EVEN_K, TILED)
    ks = tl.arange(0, BK // 32)
    s_ptrs = (ws_ptr + _row_offsets(w_row, K, SCALE_BYTES, TILED)[:, None] + _step_offset(k0, BK, SCALE_BYTES, TILED)
              + ks[None, :])
    if EVEN_K or TILED:
        ws = tl.load(s_ptrs)
    else:
        ws = tl.load(s_ptrs, mask=(k0 // 32 + ks < k_hi // 32)[None, :], other=0)
    return a, w, ws


@triton.jit
def _load_w(w_ptr, w_row, k0, k_hi, K, BK: tl.constexpr, EVEN_K: tl.constexpr,
            TILED: tl.constexpr):
    """Packed W [BN, BK/2] of one K step (zeros past k_hi: TILED, the
    padding; else masked, with k_hi/2 written (k_hi/32)*16)."""
    kp = tl.arange(0, BK // 2)
    w_ptrs = (w_ptr + _row_offsets(w_row, K, VALUE_BYTES, TILED)[:, None] + _step_offset(k0, BK, VALUE_BYTES, TILED)
              + kp[None, :])
    if EVEN_K or TILED:
        return tl.load(w_ptrs)
    else:
        return tl.load(w_ptrs, mask=(k0 // 2 + kp < k_hi // 32 * 16)[None, :], other=0)


@triton.jit
def _gemm_loop(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k_lo, k_hi, K,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               A_FMT: tl.constexpr, SWAP: tl.constexpr, FOLD: tl.constexpr,
               EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """Sum over k in [k_lo, k_hi) of A[rows, k] * W[w_row, k] -> [BM, BN]
    (rows of A not a_row_ok read as 0); every W row must be in bounds (the
    caller clamps the ones it does not keep and discards their sums).

    A plain loop, so that triton's pipeliner (num_stages) turns the loads into
    cp.async copies several steps ahead; it can only because every pointer
    and K are compiled as 16-byte aligned (cuda_kernels)."""
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        a, w, ws = _load_tiles(a_ptr, a_row_off, a_row_ok, w_ptr, ws_ptr, w_row, k0, k_hi, K, BK,
                               EVEN_K, TILED)
        if A_FMT == 0:
            a = a.to(tl.bfloat16)
        else:
            a = mx_fake_quant(a.to(tl.float32), BM, BK, A_FMT == 2).to(tl.bfloat16)
        if SWAP == 2:
            xe, xo = tl.split(tl.reshape(a, (BM, BK // 2, 2)))
            acc = _mx_dot_even_odd(acc, xe, xo, w, ws, FOLD)
        else:
            acc = _mx_dot(acc, a, w, ws, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    return acc


# ---------------------------------------------------------------------------
# gemm1: x @ W1^T + b1, activation, re-quantisation
# ---------------------------------------------------------------------------

@triton.jit
def _gemm1_tile(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, count_ptr,
                rows, entry, tok, row_ok, expert, pid_n, pid_s, H, I, swiglu_alpha, swiglu_limit,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
                INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
                SPLIT_K: tl.constexpr, FOLD: tl.constexpr, EVEN_K: tl.constexpr,
                TILED: tl.constexpr, CLEAN: tl.constexpr, SLICE_STEPS: tl.constexpr):
    """out[r, n] = act(x[tok(r)] @ W1[e, (gate|up)(n)]^T + b1) for the BN
    columns n of tile pid_n, H-slice pid_s (SLICE_STEPS K steps each but the
    last, which takes the rest; 0: slices as equal as K allows). SPLIT_K > 1: the slice is added
    into part [T*k, 2I] f32 at each row's entry (token * k + slot: the routed
    entries, fewer than the block rows at decode) and the last of the tile's SPLIT_K programs to
    arrive (count_ptr, the tile's int32 counter) applies the epilogue; part
    and the counters start at 0, and CLEAN: that program leaves them at 0
    again (a workspace, ffi.Workspace). Returns whether this program stored
    the tile."""
    e = expert.to(tl.int64)
    entry = tl.where(row_ok, entry, 0)  # padding rows' sentinel tokens index nothing
    # Accumulator column j holds gate (j even) or up (j odd) of n = n0 + j // 2.
    j = tl.arange(0, 2 * BN)
    n = pid_n * BN + j // 2
    w_row_ok = n < I
    n = tl.minimum(n, I - 1)  # columns past I read the last one (discarded)
    up = j % 2
    if INTERLEAVED:
        w_row = 2 * n + up
    else:
        w_row = n + up * I
    if SLICE_STEPS > 0:
        k_len = SLICE_STEPS * BK
    else:
        k_len = tl.cdiv(tl.cdiv(H, BK), SPLIT_K) * BK
    k_lo = pid_s * k_len
    w_ptr += e * expert_bytes(2 * I, H, VALUE_BYTES, TILED)
    ws_ptr += e * expert_bytes(2 * I, H, SCALE_BYTES, TILED)
    acc = _gemm_loop(x_ptr, tok * H, row_ok, w_ptr, ws_ptr, w_row, k_lo,
                     tl.minimum(k_lo + k_len, H), H, BM, 2 * BN, BK, A_FMT, SWAP, FOLD, EVEN_K,
                     TILED)
    last = True
    if SPLIT_K > 1:
        part = part_ptr + entry[:, None] * (2 * I) + (pid_n * 2 * BN + j)[None, :]
        ok = row_ok[:, None] & w_row_ok[None, :]
        tl.atomic_add(part, acc, mask=ok, sem="relaxed")
        # Every thread's partial sums are in before the tile's counter moves
        # (release); the last program reads them all back (acquire).
        tl.debug_barrier()
        last = tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        if SPLIT_K > 1:
            acc = tl.load(part, mask=ok, other=0.0, cache_modifier=".cg")
            if CLEAN:
                tl.debug_barrier()  # every thread has read its sums
                tl.store(part, tl.zeros_like(acc), mask=ok)
                tl.store(count_ptr, 0)
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
        cols = pid_n * BN + tl.arange(0, BN)
        tl.store(out_ptr + rows[:, None] * I + cols[None, :], h.to(tl.bfloat16),
                 mask=row_ok[:, None] & (cols < I)[None, :])
    return last


@triton.jit
def moe_gemm1(x_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sexp_ptr, nv_ptr, out_ptr, part_ptr,
              T, H, I, E, TOPK, swiglu_alpha, swiglu_limit,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
              INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
              SWAP: tl.constexpr, SPLIT_K: tl.constexpr, FOLD: tl.constexpr,
              EVEN_K: tl.constexpr, DIRECT: tl.constexpr, NMAX: tl.constexpr,
              TILED: tl.constexpr):
    """gemm1 of the sorted rows (_gemm1_tile), program (n, m, s) = column tile,
    row block, H-slice; ACT 0 = silu, 1 = swiglu_oai; out is [P, I] bf16.
    SPLIT_K > 1: part holds [T*TOPK, 2I] f32 partial sums, then one int32
    counter per tile (all zeroed by the caller)."""
    m = tl.program_id(1)
    rows, tok, slot, row_ok, expert, _, active = _route(sid_ptr, sid_ptr, sexp_ptr, nv_ptr, T,
                                                        TOPK, E, m, BM, NMAX, DIRECT, False)
    if active:
        tile = m * tl.num_programs(0) + tl.program_id(0)
        count_ptr = (part_ptr + T * TOPK * 2 * I).to(tl.pointer_type(tl.int32)) + tile
        _gemm1_tile(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, count_ptr, rows,
                    tok * TOPK + slot, tok, row_ok, expert, tl.program_id(0), tl.program_id(2),
                    H, I, swiglu_alpha, swiglu_limit, BM, BN, BK, A_FMT, OUT_FMT, ACT,
                    INTERLEAVED, HAS_BIAS, SWAP, SPLIT_K, FOLD, EVEN_K, TILED, False, 0)


# ---------------------------------------------------------------------------
# gemm2: inter @ W2^T + b2, times the routing weight, into y[token]
# ---------------------------------------------------------------------------

@triton.jit
def _gemm2_tile(inter_ptr, w_ptr, ws_ptr, b_ptr, rows, row_ok, expert, wgt, pid_n, pid_s, H, I,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP: tl.constexpr,
                FOLD: tl.constexpr, EVEN_K: tl.constexpr, TILED: tl.constexpr):
    """wgt(r) * (inter[r] @ W2[e, n]^T [+ b2[e, n] in slice 0]) over I-slice
    pid_s, for the BN columns n of tile pid_n -> (acc [BM, BN], cols, col_ok)."""
    e = expert.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < H
    k_len = tl.cdiv(tl.cdiv(I, BK), SPLIT_K) * BK
    k_lo = pid_s * k_len
    # Columns past H read row H - 1 of W2 (discarded).
    w_ptr += e * expert_bytes(H, I, VALUE_BYTES, TILED)
    ws_ptr += e * expert_bytes(H, I, SCALE_BYTES, TILED)
    acc = _gemm_loop(inter_ptr, rows * I, row_ok, w_ptr, ws_ptr, tl.minimum(cols, H - 1), k_lo,
                     tl.minimum(k_lo + k_len, I), I, BM, BN, BK, 0, SWAP, FOLD, EVEN_K, TILED)
    if HAS_BIAS:
        if pid_s == 0:
            acc += tl.load(b_ptr + e * H + cols, mask=col_ok, other=0.0)[None, :]
    return acc * wgt[:, None], cols, col_ok


@triton.jit
def moe_gemm2(inter_ptr, w_ptr, ws_ptr, b_ptr, sid_ptr, sw_ptr, sexp_ptr, nv_ptr, y_ptr,
              T, H, I, E, TOPK,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
              DETERMINISTIC: tl.constexpr, SWAP: tl.constexpr, FOLD: tl.constexpr,
              EVEN_K: tl.constexpr, DIRECT: tl.constexpr, NMAX: tl.constexpr,
              TILED: tl.constexpr):
    """gemm2 of the sorted rows (_gemm2_tile), program (n, m, s), added into y
    [T, H] f32 with atomics, or (DETERMINISTIC, SPLIT_K == 1) stored into
    y [T, TOPK, H] f32 at (token, slot)."""
    m = tl.program_id(1)
    rows, tok, slot, row_ok, expert, wgt, active = _route(sid_ptr, sw_ptr, sexp_ptr, nv_ptr, T,
                                                          TOPK, E, m, BM, NMAX, DIRECT, True)
    if active:
        acc, cols, col_ok = _gemm2_tile(inter_ptr, w_ptr, ws_ptr, b_ptr, rows, row_ok, expert,
                                        wgt, tl.program_id(0), tl.program_id(2), H, I, BM, BN,
                                        BK, SPLIT_K, HAS_BIAS, SWAP, FOLD, EVEN_K, TILED)
        ok = row_ok[:, None] & col_ok[None, :]
        if DETERMINISTIC:
            tl.store(y_ptr + (tok * TOPK + slot)[:, None] * H + cols[None, :], acc, mask=ok)
        else:
            tl.atomic_add(y_ptr + tok[:, None] * H + cols[None, :], acc, mask=ok, sem="relaxed")


# ---------------------------------------------------------------------------
# Decode: the whole layer in one launch
# ---------------------------------------------------------------------------

@triton.jit
def _store_cast(y_ptr, out_ptr, T, H, pid_n, BN: tl.constexpr, CAST_T: tl.constexpr):
    """out[:, tile] = y[:, tile] in out's dtype, for column tile pid_n; y's
    tile is left at 0 (a workspace)."""
    t = tl.arange(0, CAST_T)
    cols = pid_n * BN + tl.arange(0, BN)
    offs = t[:, None] * H + cols[None, :]
    m = (t < T)[:, None] & (cols < H)[None, :]
    v = tl.load(y_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)
    tl.debug_barrier()  # every thread has read its part of y
    tl.store(y_ptr + offs, tl.zeros_like(v), mask=m)


@triton.jit
def _clock(x):
    """(%globaltimer in ns, %smid) after x (x orders the read)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;\nmov.u32 $1, %smid;", "=l,=r,r",
                                     [x], dtype=(tl.int64, tl.int32), is_pure=False, pack=1)


@triton.jit
def _trace(scratch_ptr, sync_off, grid_m, ticket, field, x, SYNC_STRIDE: tl.constexpr):
    """TRACE: the time of this point (field 0 start, 1 routed, 2 ready, 3
    end; 4 is the SM) into int64 [programs, 8] after the scratch's counters."""
    base = (sync_off + SYNC_STRIDE * (1 + grid_m) + 15) // 16 * 16
    ptr = (scratch_ptr + base).to(tl.pointer_type(tl.int64)) + ticket * 8
    t, sm = _clock(x)
    tl.store(ptr + field, t)
    if field == 0:
        tl.store(ptr + 4, sm.to(tl.int64))


# Spin until the int32 at $1 reaches $2: an acquire load per poll (it pairs
# with the releases that counted up to it, so no separate acquire is needed
# once the target is seen), ~0.25 us of sleep between polls (without
# flooding L2 with requests).
WAIT_AT_LEAST_ASM: tl.constexpr = tl.constexpr(
    "{ .reg .pred p;\nspin:\nld.acquire.gpu.global.b32 $0, [$1];\nsetp.lt.s32 p, $0, $2;\n"
    "@p nanosleep.u32 256;\n@p bra spin;\n}")


@triton.jit
def _wait_at_least(ptr, target):
    """The int32 at ptr once it is >= target (acquire: what its writers
    released before counting up to it is visible after)."""
    return tl.inline_asm_elementwise(WAIT_AT_LEAST_ASM, "=r,l,r", [ptr, target], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def moe_decode(x_ptr, w1_ptr, w1s_ptr, b1_ptr, w2_ptr, w2s_ptr, b2_ptr, ids_ptr, tw_ptr,
               inter_ptr, scratch_ptr, out_ptr, T, H, I, E, TOPK, grid_m,
               cnt1_off, y_off, cnt2_off, sync_off, swiglu_alpha, swiglu_limit,
               BM: tl.constexpr, BN1: tl.constexpr, BK1: tl.constexpr, SPLIT1: tl.constexpr,
               BN2: tl.constexpr, BK2: tl.constexpr, SPLIT2: tl.constexpr,
               A_FMT: tl.constexpr, OUT_FMT: tl.constexpr, ACT: tl.constexpr,
               INTERLEAVED: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
               SWAP: tl.constexpr, FOLD: tl.constexpr, EVEN_K1: tl.constexpr,
               EVEN_K2: tl.constexpr, NMAX: tl.constexpr, CAST_T: tl.constexpr,
               TILED: tl.constexpr, TRACE: tl.constexpr, SLICE1: tl.constexpr,
               SYNC_STRIDE: tl.constexpr):
    """The layer at decode size in one launch (one custom call, one kernel):
    both gemms route from topk_ids (_direct_entries, _direct_block; ids_ptr,
    tw_ptr flat).

    A 1-D grid of gemm1 programs (n1 * grid_m * SPLIT1) then gemm2 programs
    (n2 * grid_m * SPLIT2), each (column tile, K slice, row block) with the
    tile fastest and the block slowest. A program's role comes from a ticket
    taken at its start, not from its block index, so every gemm1 role is
    held by a started program before any gemm2 role is handed out: a gemm2
    program waits for gemm1's n1 tiles of its row block (a counter per
    block) without relying on the order in which the hardware starts blocks,
    and without deadlock. Blocks finish roughly in ticket order, all K
    slices of a block together, so gemm2 starts on the first blocks while
    gemm1 works on the last. gemm2 adds into y (f32); the last
    program to add into a column tile (a counter per tile) writes that tile
    of out in out's dtype.

    scratch (f32 / int32, all zero at the start): gemm1's split-K partial
    sums [T * TOPK, 2I] at 0, its tile counters at cnt1_off, y [T, H] at
    y_off, gemm2's column-tile counters at cnt2_off, then the ticket and a
    counter per row block at sync_off, SYNC_STRIDE int32 apart (gemm1's
    tiles done, then gemm2's programs past their wait; every gemm2 program
    of the block polls it, so each has its own cache line). Each of them is set back to 0 by its last
    user, so the launch leaves the scratch as it found it: it can be a
    workspace (ffi.Workspace) instead of a result zeroed before every launch.
    The TRACE fields after it are written whole.
    inter [grid_m * BM, I] bf16 is gemm1's output.
    SLICE1: K steps of each of gemm1's slices but the last (0: equal slices;
    cuda._decode shortens the last slice when gemm1's programs outnumber
    what the SMs hold, so that the last programs to start finish early).
    TRACE (profiling, bench/trace_decode.py): each program's start, routed,
    ready (gemm2: its wait is over) and end times and its SM, after sync."""
    sync = (scratch_ptr + sync_off).to(tl.pointer_type(tl.int32))
    # The routing loads go out before the ticket's round trip, not after it.
    ids, tws = _direct_entries(ids_ptr, tw_ptr, T * TOPK, NMAX)
    ticket = tl.atomic_add(sync, 1, sem="relaxed")
    if ticket == tl.num_programs(0) - 1:
        tl.store(sync, 0)  # every ticket is taken
    if TRACE:
        _trace(scratch_ptr, sync_off, grid_m, ticket, 0, ticket, SYNC_STRIDE)
    n1 = tl.cdiv(I, BN1)
    n2 = tl.cdiv(H, BN2)
    p1 = n1 * grid_m * SPLIT1
    is_gemm1 = ticket < p1
    q = tl.where(is_gemm1, ticket, ticket - p1)
    nn = tl.where(is_gemm1, n1, n2)
    ns = tl.where(is_gemm1, SPLIT1, SPLIT2)
    pid_n = q % nn
    pid_s = (q // nn) % ns
    m = q // (nn * ns)
    rows, tok, slot, row_ok, expert, wgt, live = _direct_block(ids, tws, T, TOPK, E, m, BM, NMAX)
    if TRACE:
        _trace(scratch_ptr, sync_off, grid_m, ticket, 1, live + expert, SYNC_STRIDE)
    y_ptr = scratch_ptr + y_off
    if is_gemm1:
        if m < live:
            count1 = (scratch_ptr + cnt1_off).to(tl.pointer_type(tl.int32)) + m * n1 + pid_n
            stored = _gemm1_tile(x_ptr, w1_ptr, w1s_ptr, b1_ptr, inter_ptr, scratch_ptr, count1,
                                 rows, tok * TOPK + slot, tok, row_ok, expert, pid_n, pid_s, H,
                                 I, swiglu_alpha, swiglu_limit, BM, BN1, BK1, A_FMT, OUT_FMT,
                                 ACT, INTERLEAVED, HAS_BIAS1, SWAP, SPLIT1, FOLD, EVEN_K1,
                                 TILED, True, SLICE1)
            if stored:
                # The tile's stores are in before it is counted (release).
                tl.debug_barrier()
                tl.atomic_add(sync + SYNC_STRIDE * (1 + m), 1, sem="release")
    else:
        if m < live:
            _wait_at_least(sync + SYNC_STRIDE * (1 + m), n1)
            # Counted past the wait (the counter only grows while others
            # wait on it): the block's last gemm2 program resets it.
            passed = tl.atomic_add(sync + SYNC_STRIDE * (1 + m), 1, sem="relaxed")
            if TRACE:
                _trace(scratch_ptr, sync_off, grid_m, ticket, 2, ticket, SYNC_STRIDE)
            acc, cols, col_ok = _gemm2_tile(inter_ptr, w2_ptr, w2s_ptr, b2_ptr, rows, row_ok,
                                            expert, wgt, pid_n, pid_s, H, I, BM, BN2, BK2,
                                            SPLIT2, HAS_BIAS2, SWAP, FOLD, EVEN_K2,
                                            TILED)
            tl.atomic_add(y_ptr + tok[:, None] * H + cols[None, :], acc,
                          mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")
            # As in gemm1's split-K: all of this program's adds are in before
            # its arrival is counted (release); the last one reads them all.
            tl.debug_barrier()
            count2 = (scratch_ptr + cnt2_off).to(tl.pointer_type(tl.int32)) + pid_n
            if tl.atomic_add(count2, 1, sem="acq_rel") == live * SPLIT2 - 1:
                _store_cast(y_ptr, out_ptr, T, H, pid_n, BN2, CAST_T)
                tl.store(count2, 0)
            if passed == n1 + n2 * SPLIT2 - 1:
                tl.store(sync + SYNC_STRIDE * (1 + m), 0)
        elif (live == 0) & (m == 0) & (pid_s == 0):
            _store_cast(y_ptr, out_ptr, T, H, pid_n, BN2, CAST_T)  # no entry: y stays 0
    if TRACE:
        tl.debug_barrier()
        _trace(scratch_ptr, sync_off, grid_m, ticket, 3, ticket, SYNC_STRIDE)
