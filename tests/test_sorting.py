"""The sort contract (docs/DESIGN.md §3): invariants, and equality with a naive per-expert loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_mxfp4_moe.numerics import sorting


def naive_sort(ids, weights, E, BM, mask=None):
    """FlyDSL's moe_sorting_torch_native, restated with NumPy loops."""
    T, k = ids.shape
    P = T * k + E * BM - k
    out_ids = np.full(P, (k << 24) | T, np.int32)
    out_w = np.zeros(P, np.float32)
    out_e = np.full(-(-P // BM), -1, np.int32)
    pos, blk, skipped = 0, 0, 0
    for e in range(E):
        if mask is not None and not mask[e]:
            skipped += 1
            continue
        pairs = [(t, j) for t in range(T) for j in range(k) if ids[t, j] == e]
        for i, (t, j) in enumerate(pairs):
            out_ids[pos + i] = (j << 24) | t
            out_w[pos + i] = weights[t, j]
        nb = -(-len(pairs) // BM)
        out_e[blk:blk + nb] = e - skipped
        pos += nb * BM
        blk += nb
    return out_ids, out_w, out_e, np.array([pos, T], np.int32)


@functools.lru_cache(maxsize=None)
def _jit_sort(E, BM, masked):
    if masked:
        return jax.jit(lambda i, w, m: sorting.moe_sort(i, w, num_experts=E, block_m=BM, expert_mask=m))
    return jax.jit(lambda i, w: sorting.moe_sort(i, w, num_experts=E, block_m=BM))


def run_sort(ids, w, E, BM, mask=None):
    if mask is None:
        r = _jit_sort(E, BM, False)(ids, w)
    else:
        r = _jit_sort(E, BM, True)(ids, w, mask)
    return [np.asarray(a) for a in r]


def check_invariants(ids, w, E, BM, res, mask=None):
    s_ids, s_w, s_e, nv = res
    T, k = ids.shape
    P = sorting.sorted_size(T, k, E, BM)
    assert s_ids.shape == (P,) and s_w.shape == (P,) and s_e.shape == (-(-P // BM),)
    used = int(nv[0])
    assert nv[1] == T and used % BM == 0 and used <= P
    keep = (ids >= 0) & (ids < E)
    if mask is not None:
        keep &= np.asarray(mask, bool)[np.clip(ids, 0, E - 1)]
    # every kept (token, slot) exactly once, in a block of its (local) expert
    local = np.cumsum(np.asarray(mask, bool)) - 1 if mask is not None else np.arange(E)
    seen = set()
    pad = (k << 24) | T
    for p in range(P):
        entry = int(s_ids[p])
        if entry == pad:
            assert s_w[p] == 0
            continue
        assert p < used
        t, j = entry & 0xFFFFFF, entry >> 24
        assert keep[t, j] and (t, j) not in seen
        seen.add((t, j))
        assert s_e[p // BM] == local[ids[t, j]]
        assert s_w[p] == np.float32(w[t, j])
    assert len(seen) == int(keep.sum())
    # blocks: expert ids non-decreasing over used blocks, -1 after
    nb = used // BM
    assert (np.diff(s_e[:nb]) >= 0).all() and (s_e[nb:] == -1).all()
    # within an expert, entries in (token, slot) order, real ones before padding
    for b in range(nb):
        group = [int(v) for v in s_ids[b * BM:(b + 1) * BM]]
        real = [((v & 0xFFFFFF), v >> 24) for v in group if v != pad]
        assert real == sorted(real)


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([0, 1, 2, 7, 33]), k=st.sampled_from([1, 2, 4]),
       E=st.sampled_from([1, 4, 8]), BM=st.sampled_from(sorting.BLOCK_SIZES),
       seed=st.integers(0, 2**31), out_of_range=st.booleans(), one_expert=st.booleans())
def test_sort_matches_naive_and_invariants(T, k, E, BM, seed, out_of_range, one_expert):
    rng = np.random.default_rng(seed)
    if one_expert:
        ids = np.full((T, k), rng.integers(0, E), np.int32)
    else:
        ids = rng.integers(0, E, (T, k)).astype(np.int32)
    if out_of_range and T:
        bad = rng.random((T, k)) < 0.3
        ids = np.where(bad, rng.choice([-1, E, E + 5, -(2**31)], (T, k)), ids).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    res = run_sort(ids, w, E, BM)
    for got, want in zip(res, naive_sort(ids, w, E, BM)):
        np.testing.assert_array_equal(got, want)
    check_invariants(ids, w, E, BM, res)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), BM=st.sampled_from([16, 32]))
def test_sort_with_expert_mask_renumbers(seed, BM):
    rng = np.random.default_rng(seed)
    E, T, k = 8, 9, 2
    ids = rng.integers(-1, E + 1, (T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    mask = rng.random(E) < 0.5
    res = run_sort(ids, w, E, BM, mask)
    for got, want in zip(res, naive_sort(ids, w, E, BM, mask)):
        np.testing.assert_array_equal(got, want)
    check_invariants(ids, w, E, BM, res, mask)


def test_sort_large_T_all_to_one_expert():
    T, k, E, BM = 4096, 8, 16, 64
    ids = np.full((T, k), 5, np.int32)
    w = np.ones((T, k), np.float32)
    s_ids, s_w, s_e, nv = run_sort(ids, w, E, BM)
    assert nv[0] == T * k and (s_e[: T * k // BM] == 5).all() and (s_e[T * k // BM:] == -1).all()
    token, slot = s_ids[: T * k] & 0xFFFFFF, s_ids[: T * k] >> 24
    np.testing.assert_array_equal(token * k + slot, np.arange(T * k))


def test_sort_sizes_and_errors():
    assert sorting.sorted_size(1, 4, 128, 32) == 4 + 128 * 32 - 4
    for bad in (0, -32, 2.5):  # any positive block size is a contract (the kernels use 16..128)
        with pytest.raises(ValueError, match="block_m"):
            sorting.moe_sort(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1)), num_experts=4,
                             block_m=bad)
    with pytest.raises(ValueError, match="expert_mask"):
        sorting.moe_sort(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1)), num_experts=4, block_m=32,
                         expert_mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="topk_weights"):
        sorting.moe_sort(jnp.zeros((2, 1), jnp.int32), jnp.zeros((1, 1)), num_experts=4, block_m=32)


def test_cuda_row_block_bound_is_tight():
    """sorting.max_blocks(n, E, BM) bounds the blocks any routing of n
    entries fills (the decode kernels size their grid by it), and some
    routing reaches it: every split of n entries over at most E experts."""
    from jax_mxfp4_moe.numerics.sorting import max_blocks

    def splits(n, parts):  # every multiset of <= parts positive counts summing to n
        if n == 0:
            yield ()
            return
        if parts == 0:
            return
        for first in range(1, n + 1):
            for rest in splits(n - first, parts - 1):
                if not rest or rest[0] <= first:
                    yield (first, *rest)

    for BM in (2, 3, 16):
        for E in (1, 2, 3, 5, 40):
            for n in range(1, 19):
                most = max(sum(-(-c // BM) for c in s) for s in splits(n, E))
                assert max_blocks(n, E, BM) == most, (n, E, BM)
