"""NumPy functional model of the gfx950 kernels, built on their own index math.

Each function follows its kernel step by step with the same
``geometry`` functions: the sort model walks the entries 64 at a time with
ballot-style key groups; the GEMM models run the launch grid block by block,
stage the A rows through the LDS ring exactly as the DMA lanes write it
(swizzled) and the ``ds_read_b128`` lanes read it back, read the weight
tiles and the packed scale dwords lane by lane (``op_sel`` picking the
step's byte), place everything where the scaled MFMA reads it (A row
``operand_row(l)``, K ``operand_k(l, j, fmt)``; elements 2i in low
nibbles), multiply, hand the result back to lanes by ``result_row`` /
``result_col``, and run the epilogues through the same LDS and thread
mappings (gemm2 over its K splits).  The quantiser model follows the
kernels' sequence (integer block maximum, ldexp, a round-to-nearest-even
conversion written here bit by bit as the CDNA4 ISA states it).  Compared
with ``reference.moe`` (tests), this catches wrong lane-to-K mappings, scale
bytes of the wrong block or step, swizzle and DMA placement errors, gate/up
placement errors, wrong split ranges and wrong scatter rows without an AMD
GPU.  What it cannot check is the hardware's own reading of the operands,
which it takes from the CDNA4 ISA.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.numerics import formats
from jax_mxfp4_moe.rocm import geometry as ix

_LANES = np.arange(ix.WAVE)


# ------------------------------------------------------------------ sort
def sort_model(topk_ids, topk_weights, *, num_experts, block_m, expert_mask=None, chunked=None):
    """The sort kernels' algorithm: (sorted_ids, sorted_w, sorted_expert_ids, num_valid).

    ``chunked`` None picks like the backend (one launch up to
    ``SORT_ONESHOT_MAX_ENTRIES`` entries); True / False force the three-launch
    (per-chunk counts and cursors) or the one-launch algorithm."""
    ids = np.asarray(topk_ids, np.int64).reshape(-1)
    wts = np.asarray(topk_weights, np.float32).reshape(-1)
    T, K = np.shape(topk_ids)
    E, BM = num_experts, block_m
    n = T * K
    P = n + E * BM - K
    nblocks = -(-P // BM)
    mask = None if expert_mask is None else np.asarray(expert_mask).astype(bool)
    if chunked is None:
        chunked = n > ix.SORT_ONESHOT_MAX_ENTRIES
    chunk = ix.SORT_CHUNK if chunked else max(n, 1)
    nchunks = -(-n // chunk) if n else (1 if chunked else 0)

    def step_keys(start):
        i = start + _LANES
        valid = i < n
        e = np.where(valid, ids[np.minimum(i, max(n - 1, 0))] if n else 0, 0)
        ok = valid & (e >= 0) & (e < E)
        if mask is not None:
            ok &= mask[np.where(ok, e, 0)]
        key = np.where(ok, e, E)
        same = key[:, None] == key[None, :]  # what the ballots compute
        rank = np.array([np.count_nonzero(same[l, :l]) for l in _LANES])
        return i, key, same.sum(axis=1), rank

    def steps(ch):
        first = ch * chunk
        return range(first, min(first + chunk, max(n, first)), ix.WAVE)

    # 1. counts per chunk (one wave each)
    counts = np.zeros((nchunks, E), np.int64)
    for ch in range(nchunks):
        for start in steps(ch):
            _, key, size, rank = step_keys(start)
            for l in _LANES[(rank == 0) & (key < E)]:
                counts[ch, key[l]] += size[l]
    count = counts.sum(axis=0)

    # 2. offsets, local ids: lane l owns experts l*G .. l*G + G - 1; its
    # padded rows (and active experts) go through an inclusive scan over the
    # lanes (Hillis-Steele in LDS: step d adds the value 2**d lanes below)
    G = -(-E // ix.WAVE)
    eg = _LANES[:, None] * G + np.arange(G)[None, :]  # [lane, g]
    ok = eg < E
    cnt = np.where(ok, count[np.where(ok, eg, 0)], 0)
    pads = (cnt + (BM - 1)) & -BM
    acts = ok & mask[np.where(ok, eg, 0)] if mask is not None else ok
    psum, asum = pads.sum(axis=1), acts.sum(axis=1)
    incl, nincl = psum.copy(), asum.copy()
    for d in range(ix.WAVE.bit_length() - 1):
        has = _LANES >= (1 << d)
        src = np.where(has, _LANES - (1 << d), _LANES)
        incl, nincl = incl + np.where(has, incl[src], 0), nincl + np.where(has, nincl[src], 0)
    offset = np.zeros(E, np.int64)
    local = np.zeros(E, np.int64)
    run, nlocal = incl - psum, nincl - asum
    for g in range(G):
        e_g = eg[:, g][ok[:, g]]
        offset[e_g] = run[ok[:, g]]
        local[e_g] = (np.where(acts[:, g], nlocal, -1) if mask is not None else eg[:, g])[ok[:, g]]
        run, nlocal = run + pads[:, g], nlocal + acts[:, g]
    total = int(incl[ix.WAVE - 1])

    # 3. padding, block expert ids, tail
    sentinel = (K << 24) | T
    sid = np.full(P, -12345, np.int64)  # unwritten entries would show up
    sw = np.full(P, np.nan, np.float32)
    se = np.full(nblocks, -12345, np.int64)
    for e in range(E):
        padded = -(-count[e] // BM) * BM
        sid[offset[e] + count[e]:offset[e] + padded] = sentinel
        sw[offset[e] + count[e]:offset[e] + padded] = 0.0
        se[offset[e] // BM:(offset[e] + padded) // BM] = local[e]
    sid[total:] = sentinel
    sw[total:] = 0.0
    se[total // BM:] = -1

    # 4. scatter from each chunk's cursors
    base = offset[None, :] + np.cumsum(counts, axis=0) - counts
    for ch in range(nchunks):
        cursor = base[ch].copy()
        for start in steps(ch):
            i, key, size, rank = step_keys(start)
            for l in _LANES[key < E]:
                pos = cursor[key[l]] + rank[l]
                sid[pos] = ((i[l] % K) << 24) | (i[l] // K)
                sw[pos] = wts[i[l]]
            for l in _LANES[(rank == 0) & (key < E)]:
                cursor[key[l]] += size[l]
    return sid.astype(np.int32), sw, se.astype(np.int32), np.array([total, T], np.int32)



# ----------------------------------------------------- quantiser (kernel)
_EMAX = {"mxfp4": 2, "mxfp8": 8}


def _rne_small(q, mbits, bias, max_bits):
    """f32 -> a small float (``mbits`` mantissa bits, exponent ``bias``, no
    Inf/NaN encodings), round to nearest even, on the bits: the conversion
    the CDNA4 ISA states for v_cvt_scalef32_pk_fp4_f32 / _fp8_f32 (scale 1.0).
    Independent of ml_dtypes; defined for |q| up to the format's maximum
    (``max_bits``: its f32 bits; the rule keeps finite blocks below it)."""
    q = np.asarray(q, np.float32)
    u = q.view(np.uint32).astype(np.int64)
    sign, a = u >> 31, u & 0x7FFFFFFF
    if np.any(a > max_bits):
        raise ValueError("|q| above the format's maximum (or NaN) is outside the modelled range")
    e_f32 = np.maximum(a >> 23, 1)  # f32 subnormals: exponent field 1, no implicit bit
    sig = (a & 0x7FFFFF) | np.where(a >> 23 > 0, 1 << 23, 0)
    e_min = 1 - bias
    ulp_exp = np.maximum(e_f32 - 127, e_min) - mbits  # the result's unit in the last place
    shift = ulp_exp + 150 - e_f32  # q = sig * 2**(e_f32 - 150); >= 23 - mbits
    shift = np.minimum(shift, 62)
    whole = sig >> shift
    rem = sig & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    units = whole + ((rem > half) | ((rem == half) & (whole & 1 == 1)))
    carry = units >= (2 << mbits)  # rounding reached the next binade
    units = np.where(carry, units >> 1, units)
    exp = ulp_exp + mbits + carry
    normal = units >= (1 << mbits)
    bits = np.where(normal, ((exp + bias) << mbits) | (units - (1 << mbits)), units)
    return (bits | (sign << (mbits + np.int64({1: 2, 3: 4}[mbits])))).astype(np.uint8)


def hw_cvt_e2m1(q):
    """v_cvt_scalef32_pk_fp4_f32 (scale 1.0) on one value: E2M1 code 0..15."""
    return _rne_small(q, 1, 1, 0x40C00000)  # max 6.0


def hw_cvt_e4m3(q):
    """v_cvt_scalef32_pk_fp8_f32 (scale 1.0) on one value: E4M3FN bits."""
    return _rne_small(q, 3, 7, 0x43E00000)  # max 448.0


def _scale_byte(amax_bits, fmt):
    """The kernel's scale byte from the integer block maximum (mx.scale_byte)."""
    v = (np.asarray(amax_bits, np.uint32).view(np.float32) * np.float32(2.0 ** -_EMAX[fmt])).astype(np.float32)
    return formats._e8m0_from_f32_bits(v.view(np.uint32), np).astype(np.int64)


def _sw_codes(x, byte, fmt):
    """The integer/compare path the kernel takes for NaN-scale blocks (mx._sw_words): the rule itself."""
    e = 127 - byte
    e1 = e >> 1
    scaled = (x.astype(np.float64) * np.ldexp(1.0, e1) * np.ldexp(1.0, e - e1)).astype(np.float32)
    if fmt == "mxfp4":
        return formats.e2m1_encode_np(scaled)
    return formats.e4m3_encode_np(scaled)


def quantize_model(x, fmt):
    """The kernels' quantiser on blocks of 32 along the last axis: (codes
    [..., K] uint8 (E2M1 codes or E4M3 bits), scale bytes [..., K/32]).

    Block maximum as the integer max of |x| bits (NaN propagates), the scale
    byte by the rule, q = ldexp(x, 127 - byte) in f32, then the hardware
    conversion (``hw_cvt_*``); a block whose byte is 255 (NaN/Inf in it)
    takes the integer/compare path (``_sw_codes``)."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // ix.MX_BLOCK, ix.MX_BLOCK)
    bits = xb.view(np.uint32) & np.uint32(0x7FFFFFFF)
    byte = _scale_byte(bits.max(axis=-1), fmt)
    nan_block = byte == formats.E8M0_NAN
    safe = np.where(nan_block, 127, byte)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.ldexp(np.where(nan_block[..., None], 0.0, xb).astype(np.float32), (127 - safe).astype(np.int32))
    q = q.astype(np.float32)
    codes = (hw_cvt_e2m1 if fmt == "mxfp4" else hw_cvt_e4m3)(q)
    if nan_block.any():
        codes = np.where(nan_block[..., None], _sw_codes(xb, byte[..., None], fmt), codes)
    return codes.reshape(x.shape), byte.astype(np.uint8)


def quantize_bytes(x, fmt):
    """quantize_model packed as the kernels store it: (bytes [..., K/2 or K], scales [..., K/32])."""
    codes, scales = quantize_model(x, fmt)
    if fmt == "mxfp4":
        codes = formats.pack_fp4(codes)
    return codes, scales


# ------------------------------------------------------------- operands
def _decode(raw_bytes, fmt):
    """[lanes, bytes] -> [lanes, 32] element values (fp4: low nibble first)."""
    b = np.asarray(raw_bytes, np.uint8)
    if fmt == "mxfp4":
        codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)
        return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    return b.view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _scale(byte):
    return formats.e8m0_to_float_np(np.asarray(byte))


def _gather(flat, offsets, nbytes, limit=None):
    """Bytes [lanes, nbytes] at byte offsets; at or past ``limit`` (the buffer range) reads 0."""
    limit = flat.size if limit is None else min(limit, flat.size)
    idx = np.asarray(offsets, np.int64)[:, None] + np.arange(nbytes)[None, :]
    ok = (idx < limit) & (idx >= 0)
    return np.where(ok, flat[np.clip(idx, 0, max(flat.size - 1, 0))] if flat.size else 0, 0).astype(np.uint8)


def _operand(vals, scale, fmt):
    """A 16 x 128 MFMA operand (A: M x K; B transposed: N x K) as the lanes supply it:
    lane l's register-order element j lands at row ``operand_row(l)``, K
    ``operand_k(l, j, fmt)``, times the scale its MX block's lane supplies."""
    M = np.zeros((ix.MFMA_M, ix.MFMA_K))
    lane = _LANES[:, None]
    j = np.arange(ix.K_PER_LANE)[None, :]
    rows = ix.operand_row(lane)
    k = ix.operand_k(lane, j, fmt)
    M[rows, k] = vals * _scale(scale)[ix.scale_lane(rows, k // ix.MX_BLOCK)]
    return M


def _lanes_of(C):
    """The [64, 4] accumulator registers of a 16 x 16 result tile (lane l: rows result_row(l, i), column result_col(l))."""
    return C[ix.result_row(_LANES[:, None], np.arange(4)[None, :]), ix.result_col(_LANES)[:, None]]


def _dword_byte(flat, offsets, sel, limit=None):
    """Byte ``sel`` of the dword each lane loads at ``offsets`` (op_sel picks it)."""
    return _gather(flat, offsets, 4, limit)[:, sel]


def _k_loop(fmt, bm, tiles, waves, a_flat, a_limit, row_base, as_flat, as_limit, as_row, kdim, w_flat, ws_flat,
            nbs, kblocks, k0, steps):
    """Accumulators [waves][m tiles][tiles] of [64, 4] of one block over K steps [k0, k0 + steps).

    ``row_base(rows)``: byte offset of A rows (rows of the block) in ``a_flat``;
    ``as_row(rows)``: the row index of their scales; ``nbs[w][j]``: weight tiles."""
    mt = bm // ix.MFMA_M
    srow = ix.stage_row_bytes(fmt)
    step_bytes = ix.row_bytes(ix.MFMA_K, fmt)
    ops = ix.dma_ops(bm, fmt)
    rounds = -(-ops // waves)
    slot_bytes = rounds * waves * ix.WAVE * ix.DMA_BYTES
    acc = [[[np.zeros((ix.WAVE, 4)) for _ in range(tiles)] for _ in range(mt)] for _ in range(waves)]
    r16 = ix.operand_row(_LANES)
    g = ix.operand_kblock(_LANES)
    for u in range(-(-steps // ix.STAGE_STEPS)):
        # the DMA of this stage: lane l of op o writes 16 bytes at o * 1024 + 16 l
        slot = np.zeros(slot_bytes, np.uint8)
        for op in range(ops):
            row, chunk = ix.dma_lane(op, _LANES, fmt)
            src = row_base(row) + k0 * step_bytes + u * srow + chunk * ix.DMA_BYTES
            slot[op * ix.WAVE * ix.DMA_BYTES + _LANES[:, None] * ix.DMA_BYTES + np.arange(16)[None, :]] = _gather(
                a_flat, src, 16, a_limit)
        for h in range(ix.STAGE_STEPS):
            t = u * ix.STAGE_STEPS + h
            if t >= steps:
                break
            kb = k0 + t
            q, sel = kb // ix.SCALE_STEPS, kb % ix.SCALE_STEPS
            a_ops = []
            for m in range(mt):
                rows = m * ix.MFMA_M + r16
                pieces = []
                for ch in ix.a_read_chunks(_LANES, h, fmt):
                    off = rows * srow + ix.lds_chunk(rows, ch, fmt) * ix.DMA_BYTES
                    pieces.append(slot[off[:, None] + np.arange(16)[None, :]])
                a_sc = _dword_byte(as_flat, ix.act_scale_offset(as_row(rows), 4 * ix.SCALE_STEPS * q + g, kdim),
                                   sel, as_limit)
                a_ops.append(_operand(_decode(np.concatenate(pieces, axis=1), fmt), a_sc, fmt))
            for w in range(waves):
                for j in range(tiles):
                    nb = nbs[w][j]
                    b_vals = _decode(_gather(w_flat, ix.tile_offset(nb, kb, _LANES, kblocks), ix.LANE_BYTES), "mxfp4")
                    b_sc = _dword_byte(ws_flat, ix.tile_scale_offset(nb, ix.SCALE_STEPS * q, _LANES, kblocks), sel)
                    b_op = _operand(b_vals, b_sc, "mxfp4")
                    for m in range(mt):
                        with np.errstate(invalid="ignore", over="ignore"):
                            acc[w][m][j] = acc[w][m][j] + _lanes_of(a_ops[m] @ b_op.T)
    return acc


def _fmt(quant):
    return spec.quant_mode(quant).act_format


def _act(g, u, activation):
    with np.errstate(over="ignore", invalid="ignore"):
        return spec.as_activation(activation).numpy(g, u)


def _live(row_block, sorted_expert_ids, num_valid, bm, num_experts):
    eid = int(sorted_expert_ids[row_block])
    return (row_block * bm < num_valid[0] and 0 <= eid < num_experts), eid


# ------------------------------------------------------------------ gemm1
def gemm1_model(xq, xs, w1, w1_scale, b1, sorted_ids, sorted_expert_ids, num_valid, *, tokens, top_k, hidden,
                intermediate, quant, activation, gate_up, bm, tiles, waves, num_experts_sorted=None, **_):
    """The gemm1 kernel over its launch grid: (inter [P, Ip(/2)] u8, packed inter scales [P, act_scale_row_bytes(Ip)])."""
    fmt = _fmt(quant)
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    kblocks = Hp // ix.MFMA_K
    a_row = ix.row_bytes(Hp, fmt)
    out_row = ix.row_bytes(Ip, fmt)
    srow = ix.act_scale_row_bytes(Ip)
    P = len(sorted_ids)
    E = w1.shape[0]
    inter = np.zeros((P, out_row), np.uint8)
    inter_s = np.zeros((P, srow), np.uint8)
    xq_flat = np.asarray(xq, np.uint8).reshape(-1)
    xs_flat = np.asarray(xs, np.uint8).reshape(-1)
    sid = np.asarray(sorted_ids).astype(np.int64)
    cols = ix.gemm1_cols(tiles, waves)
    Es = num_experts_sorted or (P - tokens * top_k + top_k) // bm
    grid = ix.gemm_grid(2 * Ip, min(len(sorted_expert_ids), ix.max_row_blocks(tokens * top_k, Es, bm)), tiles, waves)
    seen = np.zeros((P, Ip // 8), np.int64)
    for row_block in range(grid[1]):
        live, eid = _live(row_block, sorted_expert_ids, num_valid, bm, E)
        row0 = row_block * bm
        if not live:
            continue
        w_flat = np.asarray(w1[eid], np.uint8).reshape(-1)
        ws_flat = np.asarray(w1_scale[eid], np.uint8).reshape(-1)
        tok = sid[row0:row0 + bm] & spec.TOKEN_MASK
        for n_tile in range(grid[0]):
            c0 = n_tile * cols
            if c0 >= Ip:
                continue
            first = [[ix.gemm1_tile(w * tiles + j, c0, intermediate, gate_up, tiles, waves) for j in range(tiles)]
                     for w in range(waves)]
            nbs = [[r // ix.MFMA_N for r in rw] for rw in first]
            acc = _k_loop(fmt, bm, tiles, waves, xq_flat, tokens * a_row, lambda rows: tok[rows] * a_row,
                          xs_flat, tokens * ix.act_scale_row_bytes(Hp), lambda rows: tok[rows], Hp,
                          w_flat, ws_flat, nbs, kblocks, 0, kblocks)
            pre = np.full((bm, ix.gemm1_lds_stride(tiles, waves)), np.nan)
            for w in range(waves):
                for j in range(tiles):
                    col = ix.gemm1_lds_col(w * tiles + j, ix.result_col(_LANES), gate_up, tiles, waves)
                    bias = 0.0 if b1 is None else np.asarray(b1[eid], np.float64)[first[w][j] + ix.result_col(_LANES)]
                    for m in range(bm // ix.MFMA_M):
                        for i in range(4):
                            pre[m * ix.MFMA_M + ix.result_row(_LANES, i), col] = acc[w][m][j][:, i] + bias
            ep = ix.epilogue_rows(bm)
            for p in range(bm // ep):
                for sw in range(ix.gemm1_epilogue_sweeps(bm, tiles, waves)):
                    r, cc = ix.gemm1_epilogue_item(np.arange(ix.WAVE * waves), sw, tiles, waves)
                    keep = r < ep  # with few rows, threads past the pass idle
                    r, cc = r[keep], cc[keep]
                    jcol = cc[:, None] + np.arange(8)[None, :]
                    h = _act(pre[(p * ep + r)[:, None], jcol], pre[(p * ep + r)[:, None], cols + jcol], activation)
                    h = np.where(c0 + jcol < intermediate, h, 0.0).astype(np.float32)
                    # a quad of threads (4 x 8 columns) is one MX block
                    orow = row0 + p * ep + r
                    blocks = h.reshape(-1, 4 * 8)
                    codes, sbytes = quantize_model(blocks, fmt)
                    codes = codes.reshape(-1, 8)
                    for t in range(len(r)):
                        c_abs = c0 + cc[t]
                        seen[orow[t], c_abs // 8] += 1
                        if fmt == "mxfp4":
                            inter[orow[t], c_abs // 2:c_abs // 2 + 4] = formats.pack_fp4(codes[t])
                        else:
                            inter[orow[t], c_abs:c_abs + 8] = codes[t]
                        if t % 4 == 0:
                            inter_s[orow[t], ix.act_scale_offset(0, c_abs // ix.MX_BLOCK, Ip)] = sbytes[t // 4, 0]
    # every live row block's (row, 8 columns) was written exactly once
    assert set(np.unique(seen)) <= {0, 1}
    return inter, inter_s


# ------------------------------------------------------------------ gemm2
def gemm2_model(inter, inter_s, w2, w2_scale, b2, sorted_ids, sorted_weights, sorted_expert_ids, num_valid, *,
                tokens, top_k, hidden, intermediate, quant, bm, tiles, waves, k_splits=1, deterministic=False,
                num_experts_sorted=None, **_):
    """The gemm2 kernel over its launch grid: y [T, Hp] float32 (bf16 atomics emulated
    in launch order), or with ``deterministic`` the [T * k, Hp] f32 per-slot rows."""
    fmt = _fmt(quant)
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    kblocks = Ip // ix.MFMA_K
    a_row = ix.row_bytes(Ip, fmt)
    a_flat = np.asarray(inter, np.uint8).reshape(-1)
    as_flat = np.asarray(inter_s, np.uint8).reshape(-1)
    E = w2.shape[0]
    y = np.zeros((tokens * top_k, Hp), np.float32) if deterministic else np.zeros((tokens, Hp), ml_dtypes.bfloat16)
    sid = np.asarray(sorted_ids).astype(np.int64)
    sw_all = np.asarray(sorted_weights, np.float32)
    BN = ix.block_rows(tiles, waves)
    P = len(sorted_ids)
    Es = num_experts_sorted or (P - tokens * top_k + top_k) // bm
    splits = 1 if deterministic else ix.k_splits_used(kblocks, k_splits)
    grid = ix.gemm_grid(Hp, min(len(sorted_expert_ids), ix.max_row_blocks(tokens * top_k, Es, bm)), tiles, waves,
                        splits)
    added = np.zeros((P, Hp), np.int64)
    for s in range(grid[2]):
        k0, steps = ix.k_split_range(s, kblocks, 1 if deterministic else k_splits)
        for row_block in range(grid[1]):
            live, eid = _live(row_block, sorted_expert_ids, num_valid, bm, E)
            row0 = row_block * bm
            if not live:
                continue
            w_flat = np.asarray(w2[eid], np.uint8).reshape(-1)
            ws_flat = np.asarray(w2_scale[eid], np.uint8).reshape(-1)
            for n_tile in range(grid[0]):
                c0 = n_tile * BN
                if c0 >= Hp:
                    continue
                nbs = [[c0 // ix.MFMA_N + w * tiles + j for j in range(tiles)] for w in range(waves)]
                acc = _k_loop(fmt, bm, tiles, waves, a_flat, a_flat.size, lambda rows: (row0 + rows) * a_row,
                              as_flat, as_flat.size, lambda rows: row0 + rows, Ip, w_flat, ws_flat, nbs, kblocks,
                              k0, steps)
                out = np.zeros((bm, BN), np.float32)
                for w in range(waves):
                    for j in range(tiles):
                        for m in range(bm // ix.MFMA_M):
                            for i in range(4):
                                out[m * ix.MFMA_M + ix.result_row(_LANES, i),
                                    (w * tiles + j) * ix.MFMA_N + ix.result_col(_LANES)] = acc[w][m][j][:, i]
                ep = ix.epilogue_rows(bm)
                tid = np.arange(ix.WAVE * waves)
                _, bcol = ix.gemm2_epilogue_item(tid, 0, tiles, waves)
                if b2 is not None and s == 0:
                    bias = np.asarray(b2[eid], np.float32)
                    bias = np.stack([bias[np.minimum(c0 + bcol, Hp - 1)], bias[np.minimum(c0 + bcol + 1, Hp - 1)]], 1)
                else:
                    bias = np.zeros((len(tid), 2), np.float32)
                for p in range(bm // ep):
                    for swp in range(ix.gemm2_epilogue_sweeps(bm, tiles, waves)):
                        r, col = ix.gemm2_epilogue_item(tid, swp, tiles, waves)
                        assert (col == bcol).all()  # a thread keeps its column pair: one bias load
                        assert (r < ep).all()
                        rows = row0 + p * ep + r
                        entry = sid[rows]
                        token = entry & spec.TOKEN_MASK
                        wgt = sw_all[rows]
                        vals = (np.stack([out[p * ep + r, col], out[p * ep + r, col + 1]], 1) + bias) * wgt[:, None]
                        vals = vals.astype(np.float32)
                        for t in range(len(tid)):
                            if token[t] >= tokens or c0 + col[t] >= Hp:
                                continue
                            added[rows[t], c0 + col[t]] += 1
                            cs = slice(c0 + col[t], c0 + col[t] + 2)
                            if deterministic:
                                y[token[t] * top_k + (entry[t] >> spec.TOKEN_BITS), cs] = vals[t]
                            else:
                                y[token[t], cs] = (y[token[t], cs].astype(np.float32) + vals[t].astype(
                                    ml_dtypes.bfloat16).astype(np.float32)).astype(ml_dtypes.bfloat16)
    # each (row, column pair) of every live block is added once per split
    assert set(np.unique(added)) <= {0, splits}
    return y.astype(np.float32)


# --------------------------------------------------------------- pipeline
def moe_model(x, weights, topk_weights, topk_ids, *, quant, activation, expert_mask=None, deterministic=False,
              tiles=None):
    """The whole gfx950 pipeline on gfx950-layout weights: y [T, H] float32.

    ``tiles`` (a rocm_config.Tiles) defaults to the table's choice for T."""
    from jax_mxfp4_moe.rocm import config as rocm_config, layout as rocm_layout

    x = np.asarray(np.asarray(x).astype(np.float32))
    T, H = x.shape
    K = np.shape(topk_ids)[1]
    I, E = weights.intermediate, weights.num_experts
    Hp, _ = ix.padded_dims(H, I)
    if tiles is None:
        tiles = rocm_config.choose(tokens=T, top_k=K, num_experts=E, hidden=H, intermediate=I, quant=quant,
                                   deterministic=deterministic)
    sort_E = E if expert_mask is None else len(expert_mask)
    sid, sw, se, nv = sort_model(topk_ids, topk_weights, num_experts=sort_E, block_m=tiles.bm,
                                 expert_mask=expert_mask)
    xq, xs = quantize_bytes(np.pad(x, ((0, 0), (0, Hp - H))), _fmt(quant))
    xs = rocm_layout.pack_act_scales(xs, Hp)
    b1 = None if weights.b1 is None else np.asarray(weights.b1)
    b2 = None if weights.b2 is None else np.asarray(weights.b2)
    g1 = tiles.gemm1
    inter, inter_s = gemm1_model(xq, xs, np.asarray(weights.w1), np.asarray(weights.w1_scale), b1, sid, se, nv,
                                 tokens=T, top_k=K, hidden=H, intermediate=I, quant=quant, activation=activation,
                                 gate_up=weights.gate_up, bm=tiles.bm, tiles=g1.tiles, waves=g1.waves,
                                 num_experts_sorted=sort_E)
    g2 = tiles.gemm2
    y = gemm2_model(inter, inter_s, np.asarray(weights.w2), np.asarray(weights.w2_scale), b2, sid, sw, se, nv,
                    tokens=T, top_k=K, hidden=H, intermediate=I, quant=quant, bm=tiles.bm, tiles=g2.tiles,
                    waves=g2.waves, k_splits=g2.k_splits, deterministic=deterministic, num_experts_sorted=sort_E)
    if deterministic:
        y = y.reshape(T, K, Hp).sum(axis=1)
    return y[:, :H]
