"""NumPy functional model of the gfx950 kernels, built on their own index math.

Each function follows its kernel step n_tile step with the same
``rocm_index`` functions: the sort model walks the entries 64 at a time with
ballot-style key groups; the GEMM models read, lane n_tile lane, exactly the
bytes a lane loads (pre-shuffled weight tiles, gathered activation rows),
place them where the scaled MFMA reads them (A row ``operand_row(l)``,
K ``operand_k(l, j, fmt)``; elements 2i in low nibbles), multiply, hand the result
back to lanes n_tile ``result_row``/``result_col``, and run the epilogue through
the same LDS mapping.  Compared with ``reference.moe`` (tests), this catches
wrong lane-to-K mappings, scale bytes of the wrong block, gate/up placement
errors and wrong scatter rows without an AMD GPU.  What it cannot check is
the hardware's own reading of the operands, which it takes from the CDNA4 ISA.
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

    # 2. offsets, local ids (lane 0, expert order)
    offset = np.zeros(E, np.int64)
    local = np.zeros(E, np.int64)
    run = nlocal = 0
    for e in range(E):
        offset[e] = run
        if mask is not None:
            local[e] = nlocal if mask[e] else -1
            nlocal += int(mask[e])
        else:
            local[e] = e
        run += -(-count[e] // BM) * BM
    total = run

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


def _gather(flat, offsets, nbytes):
    """Bytes [lanes, nbytes] at byte offsets; past the buffer reads 0 (buffer range check)."""
    idx = np.asarray(offsets)[:, None] + np.arange(nbytes)[None, :]
    return np.where(idx < flat.size, flat[np.minimum(idx, flat.size - 1)], 0).astype(np.uint8)


def _mfma(a_vals, a_scale, b_vals, b_scale, a_fmt):
    """One 16x16x128 scaled MFMA from lane operands (B is MXFP4); returns acc [lanes, 4]."""
    A = np.zeros((ix.MFMA_M, ix.MFMA_K))
    B = np.zeros((ix.MFMA_K, ix.MFMA_N))
    lane = _LANES[:, None]
    j = np.arange(ix.K_PER_LANE)[None, :]
    # each element takes the scale of its MX block, from the lane that supplies that block's scale
    a_sc = _scale(a_scale)
    b_sc = _scale(b_scale)
    rows = ix.operand_row(lane)
    ka = ix.operand_k(lane, j, a_fmt)
    A[rows, ka] = a_vals * a_sc[ix.scale_lane(rows, ka // ix.MX_BLOCK)]
    kw = ix.operand_k(lane, j, "mxfp4")
    B[kw, rows] = b_vals * b_sc[ix.scale_lane(rows, kw // ix.MX_BLOCK)]
    with np.errstate(invalid="ignore", over="ignore"):
        C = A @ B
    return C[ix.result_row(lane, np.arange(4)[None, :]), ix.result_col(lane)]


def _mainloop(a_flat, as_flat, a_row_off, as_row_off, fmt, w_flat, ws_flat, nb, kblocks):
    """acc [lanes, 4] of one wave for one M tile and one 16-row weight tile."""
    kstep_bytes = ix.MFMA_K // 2 if fmt == "mxfp4" else ix.MFMA_K
    acc = np.zeros((ix.WAVE, 4))
    for kb in range(kblocks):
        base = a_row_off + kb * kstep_bytes
        chunks = [ix.operand_chunks(lane, fmt) for lane in _LANES]
        pieces = [_gather(a_flat, base + np.array([ch[i][0] for ch in chunks]), ch0[1])
                  for i, ch0 in enumerate(chunks[0])]
        a_vals = _decode(np.concatenate(pieces, axis=1), fmt)
        a_sc = _gather(as_flat, as_row_off + kb * ix.SCALES_PER_MFMA_K + ix.operand_kblock(_LANES), 1)[:, 0]
        b_vals = _decode(_gather(w_flat, ix.tile_offset(nb, kb, _LANES, kblocks), ix.LANE_BYTES), "mxfp4")
        b_sc = _gather(ws_flat, ix.tile_scale_offset(nb, kb, _LANES, kblocks), 1)[:, 0]
        acc += _mfma(a_vals, a_sc, b_vals, b_sc, fmt)
    return acc


def _act(g, u, activation):
    with np.errstate(over="ignore"):
        return spec.as_activation(activation).numpy(g, u)


def _quantize(v, fmt):
    return (formats.quantize_mxfp4_np if fmt == "mxfp4" else formats.quantize_mxfp8_np)(v)


# ------------------------------------------------------------------ gemm1
def gemm1_model(xq, xs, w1, w1_scale, b1, sorted_ids, sorted_expert_ids, num_valid, *, tokens,
                hidden, intermediate, quant, activation, gate_up):
    """The gemm1 kernel over all blocks: (inter [P, Ip(/2)] u8, inter_scale [P, Ip/32] u8)."""
    fmt = spec.quant_mode(quant).act_format
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    kblocks = Hp // ix.MFMA_K
    a_row = Hp // 2 if fmt == "mxfp4" else Hp
    out_row = Ip // 2 if fmt == "mxfp4" else Ip
    P = len(sorted_ids)
    inter = np.zeros((P, out_row), np.uint8)
    inter_s = np.zeros((P, Ip // ix.MX_BLOCK), np.uint8)
    xq_flat = np.asarray(xq, np.uint8).reshape(-1)[: tokens * a_row]
    xs_flat = np.asarray(xs, np.uint8).reshape(-1)[: tokens * (Hp // ix.MX_BLOCK)]
    sid = np.asarray(sorted_ids).astype(np.int64)
    for row_block in range(len(sorted_expert_ids)):
        eid = int(sorted_expert_ids[row_block])
        row0 = row_block * ix.BM
        if not (row0 < num_valid[0] and 0 <= eid < w1.shape[0]):
            continue
        w_flat = np.asarray(w1[eid], np.uint8).reshape(-1)
        ws_flat = np.asarray(w1_scale[eid], np.uint8).reshape(-1)
        for n_tile in range(Ip // ix.BN):
            c0 = n_tile * ix.BN
            pre = np.zeros((ix.BM, ix.G1_LDS_COLS))
            for wave in range(ix.WAVES):
                for s in range(ix.M_TILES):
                    tok = sid[row0 + s * ix.MFMA_M + ix.operand_row(_LANES)] & spec.TOKEN_MASK
                    for t in range(ix.G1_TILES_PER_WAVE):
                        t_row, t_col = ix.gemm1_tile(wave, t, c0, intermediate, gate_up)
                        acc = _mainloop(xq_flat, xs_flat, tok * a_row, tok * (Hp // ix.MX_BLOCK), fmt,
                                        w_flat, ws_flat, t_row // ix.MFMA_N, kblocks)
                        bias = 0.0 if b1 is None else np.asarray(b1[eid], np.float64)[t_row + ix.result_col(_LANES)]
                        for i in range(4):
                            pre[s * ix.MFMA_M + ix.result_row(_LANES, i), t_col + ix.result_col(_LANES)] = acc[:, i] + bias
            tid = np.arange(ix.BM * ix.BN // ix.MX_BLOCK)[:, None]
            r, jb = ix.epilogue_block(tid)
            j = jb * ix.MX_BLOCK + np.arange(ix.MX_BLOCK)[None, :]
            gc, uc = ix.gemm1_lds_gate_up(j, gate_up)
            h = _act(pre[r, gc], pre[r, uc], activation)
            h = np.where(c0 + j < intermediate, h, 0.0).astype(np.float32)
            q, sc = _quantize(h, fmt)  # [threads, bytes], [threads, 1]
            nb = q.shape[1]
            ocol = c0 // ix.MX_BLOCK + jb[:, 0]
            for t in range(len(ocol)):
                inter[row0 + r[t, 0], ocol[t] * nb:(ocol[t] + 1) * nb] = q[t]
                inter_s[row0 + r[t, 0], ocol[t]] = sc[t, 0]
    return inter, inter_s


# ------------------------------------------------------------------ gemm2
def gemm2_model(inter, inter_s, w2, w2_scale, b2, sorted_ids, sorted_weights, sorted_expert_ids,
                num_valid, *, tokens, hidden, intermediate, quant):
    """The gemm2 kernel: y [T, Hp] float32, bf16 atomics emulated in sorted order."""
    fmt = spec.quant_mode(quant).act_format
    Hp, Ip = ix.padded_dims(hidden, intermediate)
    kblocks = Ip // ix.MFMA_K
    a_row = Ip // 2 if fmt == "mxfp4" else Ip
    a_flat = np.asarray(inter, np.uint8).reshape(-1)
    as_flat = np.asarray(inter_s, np.uint8).reshape(-1)
    y = np.zeros((tokens, Hp), ml_dtypes.bfloat16)
    sid = np.asarray(sorted_ids).astype(np.int64)
    for row_block in range(len(sorted_expert_ids)):
        eid = int(sorted_expert_ids[row_block])
        row0 = row_block * ix.BM
        if not (row0 < num_valid[0] and 0 <= eid < w2.shape[0]):
            continue
        w_flat = np.asarray(w2[eid], np.uint8).reshape(-1)
        ws_flat = np.asarray(w2_scale[eid], np.uint8).reshape(-1)
        for n_tile in range(Hp // ix.BN):
            c0 = n_tile * ix.BN
            out = np.zeros((ix.BM, ix.BN), np.float32)
            for wave in range(ix.WAVES):
                for s in range(ix.M_TILES):
                    r = row0 + s * ix.MFMA_M + ix.operand_row(_LANES)
                    for t in range(ix.WAVE_N // ix.MFMA_N):
                        nb = (c0 + wave * ix.WAVE_N + t * ix.MFMA_N) // ix.MFMA_N
                        acc = _mainloop(a_flat, as_flat, r * a_row, r * (Ip // ix.MX_BLOCK), fmt,
                                        w_flat, ws_flat, nb, kblocks)
                        for i in range(4):
                            out[s * ix.MFMA_M + ix.result_row(_LANES, i),
                                wave * ix.WAVE_N + t * ix.MFMA_N + ix.result_col(_LANES)] = acc[:, i]
            tid = np.arange(ix.G2_THREADS)
            pairs = [ix.gemm2_pair(tid, it) for it in range(ix.G2_PAIRS // ix.G2_THREADS)]
            rows = np.concatenate([p[0] for p in pairs])
            cols = np.concatenate([p[1] for p in pairs])
            # each (row, column pair) of the tile is added n_tile exactly one thread
            assert len(set(zip(rows.tolist(), cols.tolist()))) == ix.G2_PAIRS
            v = np.zeros((ix.BM, ix.BN), np.float32)
            v[rows, cols] = out[rows, cols]
            v[rows, cols + 1] = out[rows, cols + 1]
            if b2 is not None:
                v = v + np.asarray(b2[eid], np.float32)[c0:c0 + ix.BN]
            v = (v * np.asarray(sorted_weights, np.float32)[row0:row0 + ix.BM, None]).astype(ml_dtypes.bfloat16)
            for r in range(ix.BM):  # one atomic bf16 add per element, row n_tile row
                token = sid[row0 + r] & spec.TOKEN_MASK
                if token < tokens:
                    y[token, c0:c0 + ix.BN] = (y[token, c0:c0 + ix.BN].astype(np.float32)
                                               + v[r].astype(np.float32)).astype(ml_dtypes.bfloat16)
    return y.astype(np.float32)


# --------------------------------------------------------------- pipeline
def moe_model(x, weights, topk_weights, topk_ids, *, quant, activation, expert_mask=None):
    """The whole gfx950 pipeline on gfx950-layout weights: y [T, H] float32."""
    x = np.asarray(np.asarray(x).astype(np.float32))
    T, H = x.shape
    I, E = weights.intermediate, weights.num_experts
    Hp, _ = ix.padded_dims(H, I)
    sort_E = E if expert_mask is None else len(expert_mask)
    sid, sw, se, nv = sort_model(topk_ids, topk_weights, num_experts=sort_E, block_m=ix.BM,
                                 expert_mask=expert_mask)
    xq, xs = _quantize(np.pad(x, ((0, 0), (0, Hp - H))), spec.quant_mode(quant).act_format)
    b1 = None if weights.b1 is None else np.asarray(weights.b1)
    b2 = None if weights.b2 is None else np.asarray(weights.b2)
    inter, inter_s = gemm1_model(xq, xs, np.asarray(weights.w1), np.asarray(weights.w1_scale), b1, sid, se, nv,
                                 tokens=T, hidden=H, intermediate=I, quant=quant, activation=activation,
                                 gate_up=weights.gate_up)
    y = gemm2_model(inter, inter_s, np.asarray(weights.w2), np.asarray(weights.w2_scale), b2, sid, sw, se, nv,
                    tokens=T, hidden=H, intermediate=I, quant=quant)
    return y[:, :H]
