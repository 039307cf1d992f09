"""The CUDA backend's Triton kernels compile for sm_90a without a GPU: every
shipped variant family, with tensor-core (HGMMA) instructions in the gemms and
no local-memory spills; the whole pipeline lowers for the CUDA platform."""

import collections
import dataclasses
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

triton = pytest.importorskip("triton", reason="triton not installed")

from jax_mxfp4_moe.runtime import codecache  # noqa: E402
from jax_mxfp4_moe.numerics import sorting
from jax_mxfp4_moe.cuda import backend as cuda, compile as cuda_compile, config as cuda_config  # noqa: E402
from jax_mxfp4_moe.cuda.compile import kernel
from jax_mxfp4_moe.cuda.config import _REGIMES, choose_config  # noqa: E402

import moe_cases  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(codecache.ENV_VAR, str(tmp_path_factory.mktemp("cuda_cache")))
    cuda_compile.get_kernel.cache_clear()
    yield
    cuda_compile.get_kernel.cache_clear()
    mp.undo()


def _sass(k) -> list[tuple[int, str]]:
    """(address, opcode) of each instruction of the kernel's cubin (cuobjdump
    from the triton wheel), with the branch target of backward branches."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = codecache.object_path(k.code_hash)
    out = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), op, text) for a, text, _ in re.findall(
        r"^\s+/\*([0-9a-f]+)\*/\s+((?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*);", out, re.M)
        for op in [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]]]


def sass_ops(k) -> collections.Counter:
    """Opcode counts of the kernel's cubin."""
    return collections.Counter(op for _, op, _ in _sass(k))


def loop_ops(k, min_len=100) -> collections.Counter:
    """Opcode counts inside the kernel's loops of at least min_len
    instructions (the K loops; not the counter polls)."""
    ins = _sass(k)
    counts = collections.Counter()
    for addr, op, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if op == "BRA" and m and int(m.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(m.group(1), 16) <= a <= addr]
            if len(body) >= min_len:
                counts.update(body)
    return counts


@pytest.mark.parametrize("regime", range(len(_REGIMES)))
@pytest.mark.parametrize("fmt,act,interleaved,bias", [(0, 0, False, False), (1, 1, True, True),
                                                     (2, 0, True, False)])
def test_gemm1_variants_use_tensor_cores_without_spills(regime, fmt, act, interleaved, bias):
    _, bm, g1, _, _, *_ = _REGIMES[regime]
    a_fmt = fmt if g1.fuse_x_quant else 0  # else x is quantised by moe_quant_dequant
    split = 2 if g1.swap else 1  # the decode regimes may split K
    k = kernel("moe_gemm", "moe_gemm1", num_warps=g1.num_warps, num_stages=g1.num_stages,
               BM=bm, BN=g1.block_n, BK=g1.block_k, A_FMT=a_fmt, OUT_FMT=fmt, ACT=act,
               INTERLEAVED=interleaved, HAS_BIAS=bias, SWAP=g1.swap, SPLIT_K=split,
               FOLD=fmt == 1, EVEN_K=fmt != 2, DIRECT=False, NMAX=1, TILED=fmt != 0)
    ops = sass_ops(k)
    # split-K partial sums are f32 reductions (RED/ATOM), not CAS loops
    red = sum(c for op, c in ops.items() if op.startswith(("RED", "ATOM")))
    assert (red > 0) == (split > 1), ops
    assert ops["HGMMA" if g1.num_warps >= 4 else "HMMA"] > 0, ops
    assert ops["LDL"] == 0 and ops["STL"] == 0, "local-memory spills"
    assert (ops["LDGSTS"] > 0) == (g1.num_stages > 1), ops
    assert k.block == (32 * g1.num_warps, 1, 1)
    # Every pointer is compiled as 16-byte aligned (the launch checks it), which
    # is what lets triton vectorise the loads and pipeline them as cp.async.
    assert k.params[:9] == ("ptr16",) * 9
    assert k.params[9:16] == ("i32",) * 5 + ("f32", "f32")


@pytest.mark.parametrize("regime", range(len(_REGIMES)))
@pytest.mark.parametrize("deterministic", [False, True])
def test_gemm2_variants(regime, deterministic):
    _, bm, _, g2, _, *_ = _REGIMES[regime]
    k = kernel("moe_gemm", "moe_gemm2", num_warps=g2.num_warps, num_stages=g2.num_stages, BM=bm,
               BN=g2.block_n,
               BK=g2.block_k, SPLIT_K=1 if deterministic else 2, HAS_BIAS=not deterministic,
               DETERMINISTIC=deterministic, SWAP=g2.swap, FOLD=deterministic,
               EVEN_K=not deterministic, DIRECT=False, NMAX=1, TILED=True)
    ops = sass_ops(k)
    assert ops["HGMMA" if g2.num_warps >= 4 else "HMMA"] > 0, ops
    assert ops["LDL"] == 0 and ops["STL"] == 0
    assert (ops["LDGSTS"] > 0) == (g2.num_stages > 1), ops
    # f32 reductions into y (RED/ATOM), not CAS loops; plain stores when deterministic.
    red = sum(c for op, c in ops.items() if op.startswith(("RED", "ATOM")))
    assert (red > 0) != deterministic, ops
    assert ops["ATOMG"] == 0 or not any(op.startswith("ATOMG.E.CAS") for op in ops)


# (NMAX, split-K, FOLD, EVEN_K) of the presets' decode calls: T*k <= 16 splits
# K (gpt-oss T=1: H, I = 2880 are not multiples of the 128-wide K step), T*k =
# 32 has enough CTAs not to (deepseek T=4: 7168 and 2048 are).
@pytest.mark.parametrize("nmax,split,fold,even_k", [(4, 2, True, False), (32, 1, False, True)])
def test_decode_kernel_compiles_to_one_launch(nmax, split, fold, even_k):
    """moe_decode (both gemms, routed from topk_ids, counted cast) compiles
    with tensor cores and no spills; the weight upcast is cheaper with the
    2**126 folded into the scales (fewer bf16x2 multiplies)."""
    _, bm, g1, g2, warps, *_ = _REGIMES[0]

    def build(fold, even_k, pad=True):
        return kernel("moe_decode", "moe_decode", num_warps=g1.num_warps,
                      num_stages=g1.num_stages, BM=bm, BN1=g1.block_n, BK1=g1.block_k,
                      SPLIT1=split, BN2=g2.block_n, BK2=g2.block_k, SPLIT2=split, A_FMT=0,
                      OUT_FMT=0, ACT=1, INTERLEAVED=True, HAS_BIAS1=True, HAS_BIAS2=True,
                      SWAP=g1.swap, FOLD=fold, EVEN_K1=even_k, EVEN_K2=even_k, NMAX=nmax,
                      CAST_T=16, out_dtype="fp32",
                      maxnreg=cuda_config.decode_maxnreg(warps),
                      TILED=pad, TRACE=False, SLICE1=0, SYNC_STRIDE=32)
    k = build(fold, even_k)
    ops = sass_ops(k)
    # Capped at the registers that fit the regime's warps per SM: the K loops
    # keep everything in registers; outside them (routing, epilogues) a
    # compiler may spill a few values once per program (triton 3.9's ptxas
    # does at 112 registers, 3.6's does not).
    loops = loop_ops(k)
    assert loops["HMMA"] > 0 and loops["LDL"] == 0 and loops["STL"] == 0, loops
    assert ops["LDL"] + ops["STL"] <= 32, ops
    assert any(op.startswith("ATOMG") for op in ops), ops  # the ticket and the counters
    assert k.params[:12] == ("ptr16",) * 12
    assert k.params[12:24] == ("i32",) * 10 + ("f32", "f32")
    other = sass_ops(build(not fold, even_k))
    with_fold, without = (ops, other) if fold else (other, ops)
    assert with_fold["HMUL2"] < without["HMUL2"], (with_fold["HMUL2"], without["HMUL2"])
    # Canonical scale rows (K/32 bytes: any alignment) are loaded byte by byte
    # where they are used; the sm90 layout's tiles are copied ahead (cp.async)
    # with the weights, whether or not K is a multiple of the K step.
    canon = sass_ops(build(fold, even_k, pad=False))
    assert canon["LDG"] > ops["LDG"] and canon["LDGSTS"] < ops["LDGSTS"], (canon, ops)


# ---------------------------------------------------------------------------
# The Gluon prefill kernels (moe_wgmma) and their gather pre-pass
# ---------------------------------------------------------------------------

def _prefill_kernel(name, fold, **consts):
    pc = cuda_config.PrefillConfig()
    return kernel("moe_wgmma", name, num_warps=8, maxnreg=pc.maxnreg, BM=128, BN=pc.block_n,
                  BK=64, STAGES=pc.stages, W_STAGES=pc.w_stages, GROUP_M=pc.group_m, FOLD=fold,
                  PRODUCER_REGS=pc.producer_regs, **consts)


def innermost_loop(k, op) -> collections.Counter:
    """Opcode counts of the shortest loop of the kernel that holds `op`; "BAR128"
    counts the barriers of 128 threads in it (the producer partition's own:
    the loop's span may also hold the warp-specialisation dispatch's)."""
    ins = _sass(k)
    best = None
    for addr, o, text in ins:
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if o == "BRA" and m and int(m.group(1), 16) < addr:
            body = [(b, t) for a, b, t in ins if int(m.group(1), 16) <= a <= addr]
            if any(b == op for b, _ in body) and (best is None or len(body) < len(best)):
                best = body
    assert best is not None, f"no loop holds {op}"
    counts = collections.Counter(b for b, _ in best)
    counts["BAR128"] = sum(1 for b, t in best if b == "BAR" and t.rstrip().endswith("0x80"))
    return counts


def _check_warp_specialised_wgmma(k):
    ops = sass_ops(k)
    assert ops["HGMMA"] > 0, ops                      # async warpgroup MMA
    assert ops["LDL"] == 0 and ops["STL"] == 0, "local-memory spills"
    assert ops["UTMALDG"] > 0, ops                    # TMA loads (activations, fp4, scales)
    assert ops["SYNCS"] > 0, ops                      # mbarrier waits / arrives
    assert ops["USETMAXREG"] > 0, ops                 # registers moved between the partitions
    assert k.block == (384, 1, 1)                     # 2 consumer warpgroups + the producer
    assert k.shared_mem <= 227 * 1024
    assert k.params[-2:] == ("ptr", "null")           # global scratch (TMA descriptors), profile
    # the consumers' K loop: wgmma, one in flight while the next slot is awaited
    consumer = innermost_loop(k, "HGMMA")
    assert consumer["HGMMA"] == 4 and consumer["WARPGROUP"] >= 2, consumer  # BK 64 = 4 x k16
    return ops


@pytest.mark.parametrize("fmt,act,interleaved,bias,fold", [
    (0, 1, True, True, True), (1, 0, False, False, True), (2, 0, True, True, False),
    (0, 0, False, True, False), (2, 1, False, False, True)])
def test_wgmma_gemm1_variants(fmt, act, interleaved, bias, fold):
    k = _prefill_kernel("moe_wgmma_gemm1", fold, ACT=act, OUT_FMT=fmt, INTERLEAVED=interleaved,
                        HAS_BIAS=bias)
    _check_warp_specialised_wgmma(k)
    producer = innermost_loop(k, "HMUL2")
    # the producer's K step: 16 words of 8 E2M1 per thread, the scale in one bf16x2
    # multiply per pair (4 per word), 16-byte shared stores
    assert producer["HMUL2"] == 64 and producer["STS"] >= 16, producer
    if fold:  # one prmt per output pair, at most 2 partition barriers
        assert producer["PRMT"] == 64 and producer["BAR128"] <= 2, producer
    assert producer["HGMMA"] == 0 and producer["UTMALDG"] == 0


@pytest.mark.parametrize("bias,deterministic,fold", [(True, False, True), (False, True, False)])
def test_wgmma_gemm2_variants(bias, deterministic, fold):
    k = _prefill_kernel("moe_wgmma_gemm2", fold, HAS_BIAS=bias, DETERMINISTIC=deterministic)
    _check_warp_specialised_wgmma(k)
    # f32 atomic adds (REDG, or ATOMG from triton 3.6), or per-slot stores
    adds = [t for _, _, t in _sass(k) if re.match(r"(?:@!?U?P\w+\s+)?(?:RED|ATOM)\w*\.\S*ADD", t)]
    assert bool(adds) != deterministic, adds[:3]


@pytest.mark.parametrize("x_dtype,fmt", [("bf16", 0), ("fp32", 1), ("fp16", 2)])
def test_gather_prepass_compiles(x_dtype, fmt):
    k = kernel("moe_gather", "moe_gather", num_warps=4, x_dtype=x_dtype, BLOCK_R=16, BLOCK_K=256,
               A_FMT=fmt)
    assert k.params[:4] == ("ptr16",) * 4
    ops = sass_ops(k)
    assert ops["LDL"] == 0 and ops["STL"] == 0


def test_wgmma_kernels_address_the_sm90_layout_tile():
    from jax_mxfp4_moe.cuda import layout
    from jax_mxfp4_moe.cuda.kernels import moe_wgmma
    assert (moe_wgmma.TILE_N.value, moe_wgmma.TILE_K.value) == (layout.TILE_N, layout.TILE_K)


def test_prefill_path_lowers_for_cuda():
    """Past 64 rows per expert, sm90 weights: sort (3 launches), gather,
    the two wgmma gemms; canonical weights keep the dot_scaled kernels."""
    shape = moe_cases.GPT_OSS_LIKE
    T = 300
    assert T * shape.k / shape.E > 64
    for layout, names in (("sm90", ("moe_gather", "moe_wgmma_gemm1", "moe_wgmma_gemm2")),
                          ("canonical", ("moe_gemm1", "moe_gemm2"))):
        w = moe_cases.make_weights(shape, gate_up="interleaved", layout=layout)
        x = jnp.zeros((T, shape.H), jnp.bfloat16)
        tw = jnp.zeros((T, shape.k), jnp.float32)
        ids = jnp.zeros((T, shape.k), jnp.int32)
        f = lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="swiglu_oai",
                                                     quant="a8w4", deterministic=True)
        text = jax.jit(f).trace(x, tw, ids).lower(lowering_platforms=("cuda",)).as_text()
        for name in names:
            assert name in text, (layout, name)
        assert ("moe_wgmma" in text) == (layout == "sm90")
    # separated gate/up rows whose up half does not start on a 64-row tile
    assert not cuda_config.prefill_supported(cuda_config.PrefillConfig(), I=96,
                                             gate_up="separated", layout="sm90")
    assert cuda_config.prefill_supported(cuda_config.PrefillConfig(), I=96,
                                         gate_up="interleaved", layout="sm90")


# ---------------------------------------------------------------------------
# The grouped matmuls of the derivative (moe_gmm_wgmma, moe_gmm)
# ---------------------------------------------------------------------------

def _gmm_kernel(block_m, transpose, layout, fold=True, even_k=True):
    cfg = cuda_config.gmm_config(block_m, transpose=transpose, layout=layout)
    if cfg.wgmma is not None:
        pc = cfg.wgmma
        return kernel("moe_gmm_wgmma", "moe_gmm_wgmma", num_warps=cfg.num_warps,
                      maxnreg=pc.maxnreg, BM=block_m, BN=cfg.block_n, BK=cfg.block_k,
                      STAGES=pc.stages, W_STAGES=pc.w_stages, GROUP_M=pc.group_m,
                      TRANSPOSE=transpose, FOLD=fold, PRODUCER_REGS=pc.producer_regs)
    return kernel("moe_gmm", "moe_gmm", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  BM=block_m, BN=cfg.block_n, BK=cfg.block_k, TRANSPOSE=transpose, FOLD=fold,
                  EVEN_K=even_k, TILED=layout == "sm90")


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("transpose,fold", [(False, True), (True, True), (True, False)])
def test_gmm_wgmma_variants(block_m, transpose, fold):
    """The Gluon grouped matmul (sm90 weights, 64 or 128 rows per block):
    warpgroup MMA fed by TMA and mbarriers, registers moved between the
    partitions, no spills; the consumers' K loop keeps one wgmma in flight
    and the producer's K step is the same upcast as the prefill GEMMs'
    (16 words of 8 E2M1 per thread, one bf16x2 multiply per pair, 16-byte
    shared stores, no copies, no MMA)."""
    k = _gmm_kernel(block_m, transpose, "sm90", fold)
    ops = sass_ops(k)
    assert ops["HGMMA"] > 0 and ops["UTMALDG"] > 0 and ops["SYNCS"] > 0, ops
    assert ops["LDL"] == 0 and ops["STL"] == 0, "local-memory spills"
    assert ops["USETMAXREG"] > 0, ops
    assert k.block == (32 * (block_m // 16 + 4), 1, 1)  # consumer warpgroups + the producer
    assert k.shared_mem <= 227 * 1024
    assert k.params[-2:] == ("ptr", "null")  # global scratch (TMA descriptors), profile
    consumer = innermost_loop(k, "HGMMA")
    assert consumer["HGMMA"] == 4 and consumer["WARPGROUP"] >= 2, consumer  # BK 64 = 4 x k16
    producer = innermost_loop(k, "HMUL2")
    assert producer["HMUL2"] == 64 and producer["STS"] >= 16, producer
    assert producer["HGMMA"] == 0 and producer["UTMALDG"] == 0, producer
    if fold:
        assert producer["PRMT"] == 64 and producer["BAR128"] <= 2, producer


@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("layout,even_k", [("canonical", True), ("canonical", False),
                                           ("sm90", False)])
def test_gmm_triton_variants(block_m, transpose, layout, even_k):
    """The Triton grouped matmul (any layout and block height; the tiles the
    table gives it): tensor-core MMAs, no spills."""
    cfg = cuda_config.gmm_config(block_m, transpose=transpose, layout="canonical")
    assert cfg.wgmma is None
    k = kernel("moe_gmm", "moe_gmm", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               BM=block_m, BN=cfg.block_n, BK=cfg.block_k, TRANSPOSE=transpose, FOLD=True,
               EVEN_K=even_k, TILED=layout == "sm90")
    ops = sass_ops(k)
    assert ops["LDL"] == 0 and ops["STL"] == 0, ops
    assert ops["HGMMA"] + ops["HMMA"] > 0, ops


def test_gradient_lowers_to_the_gmm_kernels_for_cuda():
    """jax.grad of moe lowered for CUDA (no GPU needed): the sort kernels,
    then four grouped matmuls (W1 and W2 forward, then their transposes), the
    Gluon kernel with sm90 weights at 128 rows per block, the Triton one with
    canonical weights or small blocks; the layer's fused kernels do not run
    under differentiation."""
    import jax_mxfp4_moe as mm
    shape = moe_cases.GPT_OSS_LIKE
    for layout, T, name in (("sm90", 300, "moe_gmm_wgmma"), ("canonical", 300, "moe_gmm"),
                            ("sm90", 20, "moe_gmm")):
        w = moe_cases.make_weights(shape, gate_up="interleaved", bias=True, layout=layout)
        x = jnp.zeros((T, shape.H), jnp.bfloat16)
        tw = jnp.zeros((T, shape.k), jnp.float32)
        ids = jnp.zeros((T, shape.k), jnp.int32)

        def loss(x, tw, b1, b2, w=w, ids=ids):
            y = mm.moe(x, dataclasses.replace(w, b1=b1, b2=b2), tw, ids, activation="swiglu_oai")
            return jnp.sum(y.astype(jnp.float32))
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
            x, tw, w.b1, w.b2).lower(lowering_platforms=("cuda",)).as_text()
        kernels = re.findall(r'kernel = "(\w+)"', text)
        sorts = [k for k in kernels if k.startswith("moe_sort")]  # the sort kernels, as the layer's
        assert sorts and kernels[len(sorts):] == [name] * 4, (layout, T, kernels)


def test_bench_probe_kernels():
    """The bench's own ceilings (cuda/probes.py): a streaming read with
    16-byte loads, and a bf16 matmul on the warpgroup tensor cores."""
    from jax_mxfp4_moe.cuda import probes
    k = kernel("probes", "stream_read", num_warps=8, BLOCK=probes._READ_BLOCK,
               UNROLL=probes._READ_UNROLL)
    text = " ".join(t for _, _, t in _sass(k))
    assert "LDG.E.128" in text or "LDG.E.EF.128" in text or re.search(r"LDG\.E\S*\.128", text)
    k = kernel("probes", "matmul_bf16", num_warps=8, num_stages=3, **probes._MM)
    ops = sass_ops(k)
    assert ops["HGMMA"] > 0 and ops["LDL"] == 0 and ops["STL"] == 0, ops


@pytest.mark.parametrize("fp8", [False, True])
def test_quant_kernels_compile(fp8):
    k = kernel("quant", "moe_quant", num_warps=4, x_dtype="fp32", BLOCK_R=4, BLOCK_K=256, FP8=fp8)
    assert k.params[:5] == ("ptr16", "ptr16", "ptr16", "i32", "i32")
    k = kernel("quant", "moe_quant_dequant", num_warps=4, BLOCK_R=4, BLOCK_K=256, FP8=fp8)
    assert k.params[:4] == ("ptr16", "ptr16", "i32", "i32")


@pytest.mark.parametrize("T,quant,expected_launches", [
    (1, "a4w4", 1 + 1), (1, "a16w4", 1), (8, "a16w4", 1), (5000, "a4w4", 3 + 1 + 2)])
def test_pipeline_lowers_for_cuda(T, quant, expected_launches):
    shape = moe_cases.GPT_OSS_LIKE
    w = moe_cases.make_weights(shape, gate_up="interleaved")
    x = jnp.zeros((T, shape.H), jnp.bfloat16)
    tw = jnp.zeros((T, shape.k), jnp.float32)
    ids = jnp.zeros((T, shape.k), jnp.int32)
    f = lambda x, tw, ids: moe_cases.backend_moe(cuda, x, w, tw, ids, activation="swiglu_oai", quant=quant,
                                    expert_mask=None)
    text = jax.jit(f).trace(x, tw, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("jax_mxfp4_moe_launch") == expected_launches  # sort, x quant, gemm1, gemm2
    direct = T * shape.k <= cuda_config.DIRECT_MAX
    # decode: one kernel (no sort launch) that writes bf16 itself (no f32 -> bf16 convert)
    assert ("moe_sort" in text) != direct
    assert ("moe_decode" in text) == direct
    assert ("convert" in text.split("moe_decode" if direct else "moe_gemm2")[-1]) != direct


def test_config_table_properties():
    for T in (1, 8, 64, 512, 4096, 16384):
        for (k, E, H, I) in ((4, 128, 2880, 2880), (8, 256, 7168, 2048), (8, 128, 2048, 768)):
            for det in (False, True):
                c = choose_config(T, k, E, H, I, deterministic=det)
                assert c.block_m in sorting.BLOCK_SIZES
                for g in (c.gemm1, c.gemm2):
                    assert g.block_k % 32 == 0
                    # the weight tile is the MMA's M side when swapped: >= 64 rows
                    # for a warpgroup MMA (4+ warps), 16 per warp for mma.sync
                    rows = 2 * g.block_n if g is c.gemm1 else g.block_n
                    assert not g.swap or rows >= (64 if g.num_warps >= 4 else 16 * g.num_warps)
                assert c.gemm1.block_n % 32 == 0  # MX blocks of the intermediate stay in one CTA
                assert c.gemm2.split_k >= 1 and (c.gemm2.split_k == 1 or not det)
    # decode streams weights: small BM, swapped operands, split-K of both gemms
    # for enough CTAs (gpt-oss-120b T=1: 4 experts x 90 gemm1 tiles)
    c = choose_config(1, 4, 128, 2880, 2880, deterministic=False, direct=True)
    assert c.block_m == 8 and c.gemm1.swap and c.gemm1.split_k > 1 and c.gemm2.split_k > 1
    assert c.decode_maxnreg * 32 * c.warps_per_sm <= 65536
    # 8-row blocks only where the kernels route from topk_ids (the sort
    # contract's blocks are 16 rows or more)
    assert choose_config(1, 4, 128, 2880, 2880, deterministic=False).block_m == 16
    assert choose_config(1, 4, 128, 2880, 2880, deterministic=True).gemm1.split_k == 1
    # a big grid needs no split
    assert choose_config(512, 4, 128, 2880, 2880, deterministic=False).gemm1.split_k == 1
    # moe_decode runs both gemms in one kernel: one warp count, pipeline depth and operand order
    for _, _, g1, g2, _, *_ in _REGIMES:
        assert (g1.num_warps, g1.num_stages, g1.swap) == (g2.num_warps, g2.num_stages, g2.swap)
    # the wgmma kernels past 64 rows per expert only (a 128-row block is mostly
    # padding below), on 128-row blocks of the sort contract
    for T, E, want in ((512, 128, False), (2048, 128, False), (4096, 128, True), (16384, 256, True)):
        c = choose_config(T, 4 if E == 128 else 8, E, 2880, 2880, deterministic=False)
        assert (c.prefill is not None) == want, T
        if want:
            assert c.block_m == 128 and c.prefill.block_n % 128 == 0
            assert c.prefill.w_stages > c.prefill.stages  # the weights' copies lead the producer


def test_programs_per_sm_and_the_short_last_gemm1_slice():
    # Hopper's register file: 4 sub-partitions of 16K, 256 per warp at a time
    # (Nsight Compute's block limits: 6 CTAs at 168 registers, 8 at 112).
    assert [cuda_config.programs_per_sm(r, 2) for r in (168, 128, 112, 96)] == [6, 8, 8, 10]
    for steps in range(1, 60):
        for split in range(1, 9):
            s = cuda_config.gemm1_slice_steps(steps, split, programs=100, slots=99)
            assert cuda_config.gemm1_slice_steps(steps, split, programs=99, slots=99) == 0
            if s:  # every slice but the last s steps; the last non-empty and shorter
                last = steps - (split - 1) * s
                assert 0 < last < s, (steps, split, s)
    # gpt-oss-120b T=1 (H = 22.5 K steps of 128, split 3, 1080 programs for 1056 slots)
    assert cuda_config.gemm1_slice_steps(23, 3, programs=1080, slots=1056) == 9


def test_sort_takes_only_the_contracts_block_sizes():
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"block_m: expected one of \(16, 32, 64, 128\), got 8"):
        cuda.sort(ids, jnp.ones((2, 4), jnp.float32), num_experts=8, block_m=8)


def test_missing_compiler_and_cache_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(codecache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(cuda_compile, "_triton_version", lambda: None)
    cuda_compile.get_kernel.cache_clear()
    with pytest.raises(RuntimeError, match="triton is not installed"):
        kernel("quant", "moe_quant", num_warps=4, BLOCK_R=4, BLOCK_K=256, FP8=False)
    cuda_compile.get_kernel.cache_clear()


def test_ready_cache_serves_without_triton(monkeypatch, tmp_path):
    monkeypatch.setenv(codecache.ENV_VAR, str(tmp_path))
    cuda_compile.get_kernel.cache_clear()
    a = kernel("quant", "moe_quant", num_warps=4, BLOCK_R=4, BLOCK_K=256, FP8=True)
    monkeypatch.setattr(cuda_compile, "_triton_version", lambda: None)
    cuda_compile.get_kernel.cache_clear()
    b = kernel("quant", "moe_quant", num_warps=4, BLOCK_R=4, BLOCK_K=256, FP8=True)
    assert a == b
    cuda_compile.get_kernel.cache_clear()
