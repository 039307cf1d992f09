"""Kernel check without the FFI launcher: runs the Triton kernels through
triton's own launcher on torch tensors and compares with the NumPy reference
and the jnp sort. A development probe for the GPU machine (the real path is
jax_mxfp4_moe.backends.cuda through ffi.launch)."""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import torch
import triton

import jax.numpy as jnp
from jax_mxfp4_moe import formats, reference, sorting, weights as wmod
from kernels.triton import moe_gemm, moe_sort, mx_quant

dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def t(a, dtype=None):
    a = np.asarray(a)
    return torch.from_numpy(a.copy()).to(dev) if dtype is None else torch.from_numpy(a.copy()).to(dev).to(dtype)


def run_sort(ids, tw, E, BM, mask=None):
    T, K = ids.shape
    P = sorting.sorted_size(T, K, E, BM)
    NB = sorting.num_blocks(T, K, E, BM)
    nbins = 1 << (E).bit_length()
    ids_t, w_t = t(ids.astype(np.int32)).reshape(-1), t(tw.astype(np.float32)).reshape(-1)
    mask_t = t(mask.astype(np.int32)) if mask is not None else ids_t
    sid = torch.empty(P, dtype=torch.int32, device=dev)
    sw = torch.empty(P, dtype=torch.float32, device=dev)
    sexp = torch.empty(NB, dtype=torch.int32, device=dev)
    nv = torch.empty(2, dtype=torch.int32, device=dev)
    n = T * K
    if n <= 4096:
        run = torch.empty(nbins, dtype=torch.int32, device=dev)
        moe_sort.moe_sort_one[(1,)](ids_t, w_t, mask_t, sid, sw, sexp, nv, run, T, K, E, P, NB,
                                    BM=BM, NBINS=nbins, SUB=min(128, triton.next_power_of_2(max(n, 16))),
                                    BLK=64 if nbins <= 256 else 32, FILL=1024, HAS_MASK=mask is not None, num_warps=4)
    else:
        CH = 2048
        nch = triton.cdiv(n, CH)
        counts = torch.empty(nch * nbins, dtype=torch.int32, device=dev)
        run = torch.empty(nch * nbins, dtype=torch.int32, device=dev)
        moe_sort.moe_sort_count[(nch,)](ids_t, mask_t, sid, sw, counts, T, K, E, P, CH, NBINS=nbins, SUB=128,
                                        FILL=1024, HAS_MASK=mask is not None, num_warps=4)
        moe_sort.moe_sort_layout[(1,)](counts, mask_t, sexp, nv, run, T, E, NB, nch, BM=BM, NBINS=nbins,
                                       BLK=64 if nbins <= 256 else 32, HAS_MASK=mask is not None, num_warps=4)
        moe_sort.moe_sort_scatter[(nch,)](ids_t, w_t, mask_t, sid, sw, run, T, K, E, CH, NBINS=nbins, SUB=128,
                                          HAS_MASK=mask is not None, num_warps=4)
    return sid, sw, sexp, nv


def check_sort(ids, tw, E, BM, mask=None):
    sid, sw, sexp, nv = [a.cpu().numpy() for a in run_sort(ids, tw, E, BM, mask)]
    ref = sorting.moe_sort(jnp.asarray(ids), jnp.asarray(tw), num_experts=E, block_m=BM,
                           expert_mask=None if mask is None else jnp.asarray(mask))
    ok = (np.array_equal(sid, np.asarray(ref.sorted_token_ids)) and np.array_equal(sw, np.asarray(ref.sorted_weights))
          and np.array_equal(sexp, np.asarray(ref.sorted_expert_ids)) and np.array_equal(nv, np.asarray(ref.num_valid)))
    print(f"sort T={ids.shape[0]} k={ids.shape[1]} E={E} BM={BM} mask={mask is not None}: {'OK' if ok else 'MISMATCH'}")
    return ok


def run_moe(x, w, tw, ids, act, quant, BM, g1, g2, split_k=1, det=False, alpha=1.702, limit=7.0):
    T, H = x.shape
    K = ids.shape[1]
    E, I = w.num_experts, w.intermediate
    sid, sw, sexp, nv = run_sort(ids, tw, E, BM)
    P = sid.shape[0]
    grid_m = min(sorting.num_blocks(T, K, E, BM), -(-T * K // BM) + min(E, T * K))
    fmt = {"a16w4": 0, "a4w4": 1, "a8w4": 2}[quant]
    xt = t(np.asarray(x.astype(np.float32)), torch.bfloat16)
    w1, s1, w2, s2 = (t(np.asarray(a)) for a in (w.w1, w.w1_scale, w.w2, w.w2_scale))
    b1 = t(np.asarray(w.b1)) if w.b1 is not None else sw
    b2 = t(np.asarray(w.b2)) if w.b2 is not None else sw
    inter = torch.empty(P, I, dtype=torch.bfloat16, device=dev)
    BN1, BK1, SW1, NW1 = g1
    moe_gemm.moe_gemm1[(triton.cdiv(I, BN1), grid_m)](
        xt, w1, s1, b1, sid, sexp, nv, inter, sw, nv, T, H, I, alpha, limit,
        BM=BM, BN=BN1, BK=BK1, A_FMT=fmt, OUT_FMT=fmt, ACT=int(act == "swiglu_oai"),
        INTERLEAVED=w.gate_up == "interleaved", HAS_BIAS=w.b1 is not None, SWAP=SW1, SPLIT_K=1,
        num_warps=NW1)
    BN2, BK2, SW2, NW2 = g2
    y = torch.zeros((T, K, H) if det else (T, H), dtype=torch.float32, device=dev)
    moe_gemm.moe_gemm2[(triton.cdiv(H, BN2), grid_m, split_k)](
        inter, w2, s2, b2, sid, sw, sexp, nv, y, T, H, I, K,
        BM=BM, BN=BN2, BK=BK2, SPLIT_K=split_k, HAS_BIAS=w.b2 is not None, DETERMINISTIC=det, SWAP=SW2,
        num_warps=NW2)
    if det:
        y = y.sum(1)
    return y


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def main():
    rng = np.random.default_rng(0)
    ok = True
    # quant bit-exactness
    x = (rng.standard_normal((37, 512)) * np.exp(rng.uniform(-8, 8, (37, 1)))).astype(np.float32)
    x[3, 5] = np.inf
    x[4, 70] = np.nan
    for fp8, fn in ((0, formats.quantize_mxfp4_np), (1, formats.quantize_mxfp8_np)):
        xt = t(x)
        q = torch.empty((37, 512 if fp8 else 256), dtype=torch.uint8, device=dev)
        s = torch.empty((37, 16), dtype=torch.uint8, device=dev)
        mx_quant.mx_quant[(triton.cdiv(37, 4), 2)](xt, q, s, 37, 512, BLOCK_R=4, BLOCK_K=256, FP8=fp8, num_warps=4)
        rq, rs = fn(x)
        qn, sn = q.cpu().numpy(), s.cpu().numpy()
        okq = np.array_equal(sn, rs)
        bad_rows = [3, 4]
        good = np.setdiff1d(np.arange(37), bad_rows)
        okq &= np.array_equal(qn[good], rq[good])
        print(f"quant fp8={fp8}: scales {'OK' if np.array_equal(sn, rs) else 'MISMATCH'}, elements {'OK' if okq else 'MISMATCH'}")
        ok &= okq
    # sort
    for T, K, E, BM in ((1, 4, 128, 16), (7, 8, 256, 16), (64, 4, 32, 64), (1000, 8, 256, 128), (3000, 8, 64, 128)):
        ids = rng.integers(-2, E + 2, (T, K)).astype(np.int32)
        ok &= check_sort(ids, rng.random((T, K)).astype(np.float32), E, BM)
    ids = np.full((100, 4), 3, np.int32)
    ok &= check_sort(ids, rng.random((100, 4)).astype(np.float32), 8, 16)
    mask = (rng.random(64) < 0.5).astype(np.int32)
    ids = rng.integers(0, 64, (50, 4)).astype(np.int32)
    ok &= check_sort(ids, rng.random((50, 4)).astype(np.float32), 64, 32, mask)
    ids = rng.integers(0, 64, (2000, 4)).astype(np.int32)
    ok &= check_sort(ids, rng.random((2000, 4)).astype(np.float32), 64, 32, mask)
    # moe small shapes
    E, H, I, K = 8, 256, 128, 2
    small = dict(BM=16, g1=(32, 128, True, 4), g2=(64, 128, True, 4))
    large = dict(BM=128, g1=(32, 64, False, 8), g2=(64, 64, False, 8))
    for gate_up in ("separated", "interleaved"):
        for bias in (False, True):
            w1 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) / np.sqrt(H)
            w2 = rng.standard_normal((E, H, I)).astype(np.float32) / np.sqrt(I)
            b1 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1 if bias else None
            b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1 if bias else None
            w = wmod.prepare_weights(w1, w2, b1, b2, gate_up=gate_up)
            for T in (1, 7, 300):
                x = rng.standard_normal((T, H)).astype(np.float32)
                ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
                tw = rng.random((T, K)).astype(np.float32)
                for act in ("silu", "swiglu_oai"):
                    for quant in ("a16w4", "a8w4", "a4w4"):
                        xb = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
                        ref = reference.moe(xb, w, tw, ids, activation=act, quant=quant)
                        for name, c in (("small", small), ("large", large)):
                            for det, sk in ((False, 1), (True, 1), (False, 2)):
                                if name == "large" and sk == 2:
                                    continue
                                y = run_moe(xb, w, tw, ids, act, quant, c["BM"], c["g1"], c["g2"], split_k=sk, det=det).cpu().numpy()
                                r = rel(y, ref)
                                bound = 1e-2 if quant == "a16w4" else 5e-2
                                good = r <= bound
                                ok &= good
                                if not good or T == 300:
                                    print(f"moe {gate_up} bias={bias} T={T} {act} {quant} {name} det={det} sk={sk}: rel={r:.2e} {'OK' if good else 'FAIL'}")
    print("ALL OK" if ok else "SOME FAILED")


if __name__ == "__main__":
    main()
