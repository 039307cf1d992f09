"""Device driver for the Gluon prefill kernels (cuda/kernels/moe_wgmma.py),
standalone: triton's own launcher and torch tensors, jax on the CPU for the
sort contract, the weights' layout and the float64 reference.

  python bench/wgmma_driver.py check      # every mode / layout / activation / bias / mask vs reference
  python bench/wgmma_driver.py time       # gpt-oss-120b and deepseek-v3 at T = 512, 4096, 16384
  python bench/wgmma_driver.py sanitize   # one small case per gemm (run under compute-sanitizer)

Prints one line per case; the last lines are a summary table.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from jax_mxfp4_moe import prepare_weights  # noqa: E402
from jax_mxfp4_moe.layer import routing  # noqa: E402
from jax_mxfp4_moe.numerics import reference, sorting  # noqa: E402
from jax_mxfp4_moe.cuda.kernels import moe_gather, moe_wgmma  # noqa: E402

NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
FMT = {"a16w4": 0, "a4w4": 1, "a8w4": 2}
ACT = {"silu": 0, "swiglu_oai": 1}

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


class Cfg:
    def __init__(self, BM=128, BN=256, STAGES=3, W_STAGES=5, GROUP_M=8, PREGS=96, MAXNREG=168, FOLD=True):
        self.BM, self.BN, self.STAGES, self.W_STAGES = BM, BN, STAGES, W_STAGES
        self.GROUP_M, self.PREGS, self.MAXNREG, self.FOLD = GROUP_M, PREGS, MAXNREG, FOLD

    def __repr__(self):
        return (f"BM{self.BM}-BN{self.BN}-S{self.STAGES}-W{self.W_STAGES}-G{self.GROUP_M}-P{self.PREGS}"
                + ("" if self.FOLD else "-nofold"))


def max_blocks(n, E, BM):
    u = min(E, n)
    return u + (n - u) // BM


def layer(x, w, sid, sw, sexp, nv, T, k, E, H, I, *, act, fmt, interleaved, det, cfg, times=None):
    """gather -> gemm1 -> gemm2 (+ slot sum when det) on torch tensors; w a
    dict of torch tensors in the sm90 layout."""
    P = sid.shape[0]
    dev = x.device
    BM, BN = cfg.BM, cfg.BN
    xs = torch.empty((P, H), dtype=torch.bfloat16, device=dev)
    inter = torch.empty((P, I), dtype=torch.bfloat16, device=dev)
    y = torch.zeros((T, k, H) if det else (T, H), dtype=torch.float32, device=dev)
    dummy = sw
    grid_m = min(max_blocks(T * k, E, BM), sexp.shape[0])
    nt1 = -(-I // (BN // 2))
    nt2 = -(-H // BN)
    g1 = min(NUM_SMS, grid_m * nt1)
    g2 = min(NUM_SMS, grid_m * nt2)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if times is not None else None
    if ev:
        ev[0].record()
    moe_gather.moe_gather[(-(-P // 16), -(-H // 256))](x, sid, nv, xs, T, H, P, BLOCK_R=16, BLOCK_K=256,
                                                        A_FMT=fmt, num_warps=4)
    if ev:
        ev[1].record()
    b1 = w.get("b1")
    moe_wgmma.moe_wgmma_gemm1[(g1, )](
        xs, w["w1"], w["w1_scale"], dummy if b1 is None else b1, sid, sexp, nv, inter, P, H, I, E, 1.702, 7.0,
        BM=BM, BN=BN, BK=64, STAGES=cfg.STAGES, W_STAGES=cfg.W_STAGES, GROUP_M=cfg.GROUP_M, ACT=act,
        OUT_FMT=fmt, INTERLEAVED=interleaved, HAS_BIAS=b1 is not None, FOLD=cfg.FOLD, PRODUCER_REGS=cfg.PREGS,
        num_warps=BM // 16, maxnreg=cfg.MAXNREG)
    if ev:
        ev[2].record()
    b2 = w.get("b2")
    moe_wgmma.moe_wgmma_gemm2[(g2, )](
        inter, w["w2"], w["w2_scale"], dummy if b2 is None else b2, sid, sw, sexp, nv, y, P, T, H, I, E, k,
        BM=BM, BN=BN, BK=64, STAGES=cfg.STAGES, W_STAGES=cfg.W_STAGES, GROUP_M=cfg.GROUP_M,
        HAS_BIAS=b2 is not None, DETERMINISTIC=det, FOLD=cfg.FOLD, PRODUCER_REGS=cfg.PREGS, num_warps=BM // 16,
        maxnreg=cfg.MAXNREG)
    if ev:
        ev[3].record()
        torch.cuda.synchronize()
        times.append([ev[i].elapsed_time(ev[i + 1]) for i in range(3)])
    return y.sum(1) if det else y


def to_torch(a, dev="cuda"):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a))).to(dev)


def check_case(name, E, k, H, I, T, quant, act, gate_up, bias, det, mask_some, cfg, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((E, 2 * I, H)).astype(np.float32) / np.sqrt(H)
    w2 = rng.standard_normal((E, H, I)).astype(np.float32) / np.sqrt(I)
    b1 = rng.standard_normal((E, 2 * I)).astype(np.float32) * 0.1 if bias else None
    b2 = rng.standard_normal((E, H)).astype(np.float32) * 0.1 if bias else None
    canon = prepare_weights(w1, w2, b1, b2, gate_up=gate_up)
    assert canon.scale_max <= 128 or not cfg.FOLD, canon.scale_max
    tiled = canon.to_layout("sm90")
    x = (rng.standard_normal((T, H)) * 2.0).astype(np.float32)
    logits = jnp.asarray(rng.standard_normal((T, E)), jnp.float32)
    tw, ti = routing.topk_softmax(logits, k)
    ti = np.asarray(ti).copy()
    if mask_some:  # ids outside [0, E) contribute nothing
        ti[rng.random(ti.shape) < 0.2] = E + 3
        ti[0, 0] = -1
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = reference.moe(xb, canon, tw, ti, activation=act, quant=quant)
    s = sorting.moe_sort(jnp.asarray(ti), jnp.asarray(tw), num_experts=E, block_m=cfg.BM)
    w = {n: to_torch(getattr(tiled, n)) for n in ("w1", "w1_scale", "w2", "w2_scale")}
    if bias:
        w["b1"], w["b2"] = to_torch(tiled.b1), to_torch(tiled.b2)
    y = layer(to_torch(np.asarray(xb.astype(jnp.float32))).to(torch.bfloat16), w,
              to_torch(s.sorted_token_ids), to_torch(s.sorted_weights), to_torch(s.sorted_expert_ids),
              to_torch(s.num_valid), T, k, E, H, I, act=ACT[act], fmt=FMT[quant],
              interleaved=gate_up == "interleaved", det=det, cfg=cfg)
    y = y.to(torch.bfloat16).float().cpu().numpy().astype(np.float64)
    denom = max(np.linalg.norm(ref), 1e-30)
    fro = np.linalg.norm(y - ref) / denom
    mx = np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30)
    ok = np.isfinite(y).all() and fro <= 1e-2 and mx <= 5e-2
    print(f"{'PASS' if ok else 'FAIL'} {name} E{E} k{k} H{H} I{I} T{T} {quant} {act} {gate_up} "
          f"bias={bias} det={det} mask={mask_some} {cfg}: fro {fro:.2e} maxabs {mx:.2e}", flush=True)
    return ok


def _check_one(args):
    case, cfg = args
    return check_case(*case, cfg=cfg)


def check(workers=8):
    cfg = Cfg()
    cases = [("gptlike", 8, 4, 256, 256, 300, "a16w4", act, gate_up, True, False, False)
             for act, gate_up in (("swiglu_oai", "interleaved"), ("silu", "separated"), ("silu", "interleaved"),
                                  ("swiglu_oai", "separated"))]
    cases += [("gptlike", 8, 4, 256, 256, 300, "a8w4", "swiglu_oai", "interleaved", False, False, False),
              ("gptlike", 8, 4, 256, 256, 300, "a4w4", "silu", "separated", True, False, False)]
    cases += [
        ("oddK", 8, 4, 320, 192, 77, "a16w4", "silu", "separated", True, False, True),
        ("oddK", 8, 4, 2880 // 9, 320, 129, "a8w4", "swiglu_oai", "interleaved", True, False, False),
        ("det", 8, 4, 256, 256, 300, "a16w4", "swiglu_oai", "interleaved", True, True, False),
        ("det-mask", 16, 8, 256, 128, 61, "a4w4", "silu", "separated", False, True, True),
        ("mask", 16, 8, 256, 128, 1000, "a16w4", "silu", "separated", True, False, True),
        ("T1", 8, 4, 256, 256, 1, "a16w4", "swiglu_oai", "interleaved", True, False, False),
    ]
    jobs = [(c, cfg) for c in cases]
    jobs += [(c, Cfg(BN=128, STAGES=4, W_STAGES=6, GROUP_M=4)) for c in (cases[0], cases[5], cases[9])]
    jobs += [(c, Cfg(FOLD=False)) for c in (cases[1], cases[4], cases[8], cases[9])]
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # compiles in parallel
        results = pool.map(_check_one, jobs, chunksize=1)
    print(f"CHECK {sum(results)}/{len(results)} passed", flush=True)
    return all(results)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

PRESETS = {"gpt-oss-120b": (128, 4, 2880, 2880, "swiglu_oai", "interleaved"),
           "deepseek-v3": (256, 8, 7168, 2048, "silu", "separated")}


def sort_torch(ids, tw, E, BM):
    """The sort contract in torch (no expert mask; ids in range)."""
    T, k = ids.shape
    P = T * k + E * BM - k
    NB = -(-P // BM)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + BM - 1) // BM * BM
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    e = flat[order]
    rank = torch.arange(T * k, device=ids.device) - start[e]
    dest = pstart[e] + rank
    sid = torch.full((P, ), (k << 24) | T, dtype=torch.int32, device=ids.device)
    sid[dest] = ((order % k) << 24 | (order // k)).int()
    sw = torch.zeros(P, dtype=torch.float32, device=ids.device)
    sw[dest] = tw.reshape(-1)[order]
    used = int(pend[-1])
    bstart = torch.arange(NB, device=ids.device) * BM
    sexp = torch.searchsorted(pend, bstart, right=True).int()
    sexp[bstart >= used] = -1
    nv = torch.tensor([used, T], dtype=torch.int32, device=ids.device)
    return sid, sw, sexp, nv


def sm90_random(E, N, K, dev):
    NT, KT = -(-N // 64), -(-K // 128)
    v = torch.randint(0, 256, (E, NT, KT, 64, 64), dtype=torch.uint8, device=dev)
    s = torch.randint(119, 124, (E, NT, KT, 64, 4), dtype=torch.uint8, device=dev)
    return v, s


def bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def timing(cfgs):
    rows = []
    dev = "cuda"
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    ms = bench(lambda: a @ b)
    peak = 2 * 8192 ** 3 / ms / 1e9
    print(f"bf16 peak (torch.matmul 8192^3, random): {peak:.0f} TFLOP/s", flush=True)
    del a, b
    big = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(big)
    ms = bench(lambda: dst.copy_(big))
    print(f"HBM copy 4 GiB: {2 * big.numel() / ms / 1e9:.2f} TB/s (read + write)", flush=True)
    f32 = big.view(torch.float32)
    ms = bench(lambda: f32.sum())
    print(f"HBM read (f32 sum) 4 GiB: {big.numel() / ms / 1e9:.2f} TB/s", flush=True)
    del big, dst
    for name, (E, k, H, I, act, gate_up) in PRESETS.items():
        torch.manual_seed(0)
        w1, w1s = sm90_random(E, 2 * I, H, dev)
        w2, w2s = sm90_random(E, H, I, dev)
        w = {"w1": w1, "w1_scale": w1s, "w2": w2, "w2_scale": w2s}
        if name.startswith("gpt"):
            w["b1"] = torch.randn(E, 2 * I, device=dev) * 0.1
            w["b2"] = torch.randn(E, H, device=dev) * 0.1
        for T in (1024, 4096, 16384):
            x = torch.randn(T, H, dtype=torch.bfloat16, device=dev)
            ids = torch.rand(T, E, device=dev).topk(k, dim=1).indices.int()
            tw = torch.rand(T, k, device=dev)
            tw = tw / tw.sum(1, keepdim=True)
            flops = 2.0 * T * k * 3 * H * I
            for cfg in cfgs:
                s = sort_torch(ids, tw, E, cfg.BM)
                for quant in ("a16w4", "a8w4", "a4w4"):
                    if quant != "a16w4" and (cfg is not cfgs[0] or T != 4096):
                        continue
                    if cfg is not cfgs[0] and T == 1024:
                        continue
                    fn = lambda: layer(x, w, *s, T, k, E, H, I, act=ACT[act], fmt=FMT[quant],
                                       interleaved=gate_up == "interleaved", det=False, cfg=cfg)
                    ms = bench(fn)
                    parts = []
                    for _ in range(5):
                        layer(x, w, *s, T, k, E, H, I, act=ACT[act], fmt=FMT[quant],
                              interleaved=gate_up == "interleaved", det=False, cfg=cfg, times=parts)
                    g, m1, m2 = np.median(np.array(parts), 0)
                    tf = flops / ms / 1e9
                    line = (f"{name} T={T} {quant} {cfg}: {ms * 1e3:.0f} us total, {tf:.0f} TFLOP/s "
                            f"({100 * tf / peak:.1f}% of peak); gather {g * 1e3:.0f} us, gemm1 {m1 * 1e3:.0f} "
                            f"({2 * T * k * 2 * H * I / m1 / 1e9:.0f} TF), gemm2 {m2 * 1e3:.0f} us "
                            f"({2 * T * k * H * I / m2 / 1e9:.0f} TF)")
                    print(line, flush=True)
                    rows.append(line)
            del x
        del w, w1, w2, w1s, w2s
        torch.cuda.empty_cache()
    print("SUMMARY")
    for r in rows:
        print(r)


def sanitize():
    ok = check_case("san", 8, 4, 256, 256, 300, "a16w4", "swiglu_oai", "interleaved", True, False, True,
                    cfg=Cfg())
    ok &= check_case("san-det", 16, 8, 256, 128, 61, "a4w4", "silu", "separated", False, True, True,
                     cfg=Cfg(BN=128, STAGES=4, W_STAGES=6, GROUP_M=4))
    ok &= check_case("san-nofold", 8, 4, 320, 192, 77, "a16w4", "silu", "separated", True, False, True,
                     cfg=Cfg(FOLD=False))
    torch.cuda.synchronize()
    print("SANITIZE-CASES", "ok" if ok else "FAILED")


if __name__ == "__main__":
    t0 = time.time()
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    if what == "check":
        check()
    elif what == "time":
        timing([Cfg(), Cfg(GROUP_M=16)])
    elif what == "sanitize":
        sanitize()
    print(f"[{what} took {time.time() - t0:.0f} s]")
