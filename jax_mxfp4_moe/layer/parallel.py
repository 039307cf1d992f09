"""Expert parallelism (EP) and tensor parallelism (TP) of the MoE layer.

One device runs the single-device layer (`jax_mxfp4_moe.moe`) on its shard;
everything else is JAX's own SPMD machinery inside `shard_map`:

- EP: experts split in contiguous blocks of E/De over ``expert_axis``; tokens
  arrive sharded over the same axis. Two dispatch strategies:
  ``gather_scatter`` all-gathers tokens and routing, runs the local experts
  (the rest masked out with ``expert_mask``) and reduce-scatters the partial
  outputs back to the token owners; ``all_to_all`` sends each token once to
  every device that owns one of its experts into fixed per-destination
  blocks, computes there and sends the results back; on GPU only the used
  rows of each block travel (`lax.ragged_all_to_all`, which XLA:CPU does not
  lower), on CPU whole blocks (`lax.all_to_all`).
- TP: the intermediate dim I split over ``tensor_axis`` on MX block
  boundaries; partial outputs summed with `psum`.

docs/PARALLEL.md explains which strategy to choose, with `comm_bytes`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_mxfp4_moe.numerics.formats import MX_BLOCK
from jax_mxfp4_moe.layer.layouts import CANONICAL

STRATEGIES = ("gather_scatter", "all_to_all")
# Below this many tokens per EP device, "auto" keeps gather_scatter: at decode
# size both strategies move a few KB and gather_scatter needs two collectives
# where all_to_all needs two plus its index bookkeeping.
AUTO_MIN_TOKENS_PER_DEVICE = 64

# --------------------------------------------------------------------------
# shard_map across jax versions
# --------------------------------------------------------------------------

def _shard_map(f, mesh, in_specs, out_specs):
    # check_vma/check_rep off: the local layer may be an FFI custom call,
    # which carries no replication rule.
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # jax < 0.7
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     check_rep=False)


# --------------------------------------------------------------------------
# Layout: specs, sizes, validation
# --------------------------------------------------------------------------

def _axis_size(mesh: Mesh, axis: str | None, arg: str) -> int:
    if axis is None:
        return 1
    if axis not in mesh.axis_names:
        raise ValueError(f"{arg}={axis!r} is not an axis of the mesh; "
                         f"its axes are {tuple(mesh.axis_names)}")
    return int(mesh.shape[axis])


def mesh_sizes(mesh: Mesh, expert_axis: str | None,
               tensor_axis: str | None) -> tuple[int, int]:
    """(EP size, TP size) after checking the axis names against ``mesh``."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if expert_axis is not None and expert_axis == tensor_axis:
        raise ValueError(f"expert_axis and tensor_axis must differ, both are {expert_axis!r}")
    types = getattr(mesh, "axis_types", None)
    if types is not None:
        for name, t in zip(mesh.axis_names, types):
            if name in (expert_axis, tensor_axis) and "Explicit" in str(t):
                raise ValueError(f"mesh axis {name!r} has axis type {t}; "
                                 "parallel.moe needs Auto axes (jax.sharding.Mesh's default)")
    return (_axis_size(mesh, expert_axis, "expert_axis"),
            _axis_size(mesh, tensor_axis, "tensor_axis"))


def check_divisible(num_experts: int, intermediate: int, *, expert_axis: str | None,
                    expert_size: int, tensor_axis: str | None, tensor_size: int) -> None:
    """EP needs De | E; TP needs Dt | I/32 so every shard holds whole MX blocks."""
    if num_experts % expert_size:
        raise ValueError(f"expert_axis {expert_axis!r} has size {expert_size}, which does "
                         f"not divide the number of experts E={num_experts}")
    if intermediate % MX_BLOCK or (intermediate // MX_BLOCK) % tensor_size:
        raise ValueError(f"tensor_axis {tensor_axis!r} has size {tensor_size}, which does "
                         f"not divide I/{MX_BLOCK}={intermediate / MX_BLOCK:g} MX blocks "
                         f"(intermediate I={intermediate})")


def weight_specs(expert_axis: str | None, tensor_axis: str | None) -> dict[str, P]:
    """PartitionSpec of each MoEWeights array: E over EP; W1 rows (2I), b1 and
    W2 / W2-scale columns (I/2, I/32) over TP; H never split."""
    ea, ta = expert_axis, tensor_axis
    return {
        "w1": P(ea, ta, None), "w1_scale": P(ea, ta, None),
        "w2": P(ea, None, ta), "w2_scale": P(ea, None, ta),
        "b1": P(ea, ta), "b2": P(ea, None),
    }


def check_weight_sharding(weights, mesh: Mesh, *, expert_axis: str | None,
                          tensor_axis: str | None) -> None:
    """Concrete weight arrays must be laid out as `shard_weights` lays them out
    for the same mesh and axes (tracers are not checked: jit reshards them)."""
    es, ts = mesh_sizes(mesh, expert_axis, tensor_axis)
    check_divisible(weights.num_experts, weights.intermediate, expert_axis=expert_axis,
                    expert_size=es, tensor_axis=tensor_axis, tensor_size=ts)
    if weights.layout != CANONICAL:
        raise ValueError(f"weights.layout must be {CANONICAL!r} (shard_weights converts); "
                         f"got {weights.layout!r}")
    if ts > 1 and weights.gate_up != "interleaved":
        raise ValueError(f"tensor_axis {tensor_axis!r} of size {ts} needs weights from "
                         f"shard_weights (gate_up='interleaved' so each shard holds matching "
                         f"gate and up rows); got gate_up={weights.gate_up!r}")
    specs = weight_specs(expert_axis, tensor_axis)
    for name, a in weights.arrays().items():
        if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array):
            continue
        want = NamedSharding(mesh, specs[name])
        if not a.sharding.is_equivalent_to(want, a.ndim):
            got = getattr(a.sharding, "spec", a.sharding)
            raise ValueError(
                f"weights.{name} is sharded as {got}, but expert_axis={expert_axis!r} "
                f"(size {es}) and tensor_axis={tensor_axis!r} (size {ts}) need "
                f"{specs[name]} on this mesh; prepare it with shard_weights(..., "
                f"expert_axis={expert_axis!r}, tensor_axis={tensor_axis!r})")


def _separated_to_interleaved(a: np.ndarray, intermediate: int) -> np.ndarray:
    # rows [0, I) gate, [I, 2I) up  ->  row 2i gate i, row 2i+1 up i
    out = np.empty_like(a)
    out[:, 0::2] = a[:, :intermediate]
    out[:, 1::2] = a[:, intermediate:]
    return out


def shard_weights(weights, mesh: Mesh, *, expert_axis: str | None = None,
                  tensor_axis: str | None = None):
    """Device-put ``weights`` so each device holds only its experts and I slice.

    Returns canonical-layout MoEWeights (global shapes, NamedSharding per
    `weight_specs`); the single-device layer re-lays out each shard for its
    backend.
    With TP over more than one device, ``separated`` gate/up rows are
    re-ordered host-side to ``interleaved`` (the same layer, gate_up field
    updated): a contiguous shard of the 2I rows then holds the gate and up
    rows of the same intermediate slice, which the activation pairs up.
    """
    es, ts = mesh_sizes(mesh, expert_axis, tensor_axis)
    check_divisible(weights.num_experts, weights.intermediate, expert_axis=expert_axis,
                    expert_size=es, tensor_axis=tensor_axis, tensor_size=ts)
    weights = weights.canonical()  # shards are slices of the logical arrays
    arrays = weights.arrays()
    changes: dict[str, Any] = {}
    if ts > 1 and weights.gate_up == "separated":
        for name in ("w1", "w1_scale", "b1"):
            if name in arrays:
                arrays[name] = _separated_to_interleaved(np.asarray(arrays[name]),
                                                         weights.intermediate)
        changes["gate_up"] = "interleaved"
    specs = weight_specs(expert_axis, tensor_axis)
    for name, a in arrays.items():
        changes[name] = jax.device_put(a, NamedSharding(mesh, specs[name]))
    return dataclasses.replace(weights, **changes)


# --------------------------------------------------------------------------
# Communication arithmetic
# --------------------------------------------------------------------------

def capacity(tokens_per_device: int, top_k: int, devices: int,
             capacity_factor: float | None) -> int:
    """Rows each device reserves per destination in ``all_to_all``.

    None: tokens_per_device, the worst case (every local token has an expert
    on that destination), so nothing can drop. Otherwise
    ceil(capacity_factor * tokens_per_device * top_k / devices), at most the
    worst case: factor 1 fits perfectly balanced routing.
    """
    if capacity_factor is None:
        return tokens_per_device
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
    c = math.ceil(capacity_factor * tokens_per_device * top_k / devices)
    return max(1, min(tokens_per_device, c))


def expected_rows_per_peer(tokens_per_device: int, top_k: int, devices: int,
                           experts: int) -> float:
    """Expected rows a device sends one peer in ragged all_to_all when each
    token picks top_k distinct experts uniformly: tokens_per_device times
    P(at least one of them among that peer's E/De) = 1 - C(E-E/De, k) / C(E, k)."""
    e_l = experts // devices
    miss = math.comb(experts - e_l, top_k) / math.comb(experts, top_k)
    return tokens_per_device * (1.0 - miss)


def comm_bytes(strategy: str, *, devices: int, tokens: int, top_k: int, hidden: int,
               dtype_bytes: int, tensor_devices: int = 1,
               capacity_factor: float | None = None, ragged: bool = False,
               experts: int | None = None) -> dict[str, int]:
    """Bytes one device sends to / receives from other devices per layer call.

    ``devices`` is the EP size De (1 for TP only), ``tensor_devices`` the TP
    size Dt, ``tokens`` the global T. Counts payload that leaves the device
    (its own block of a collective stays local); the all-reduce of TP is
    counted as reduce-scatter + all-gather, 2 (Dt-1)/Dt of its buffer.
    Routing travels as int32 id + f32 weight per slot. Dense all_to_all moves
    its full capacity whatever the routing; ``ragged=True`` (GPU) moves only
    the rows routed to each peer: the figure is the expectation under uniform
    routing over ``experts`` (`expected_rows_per_peer`), plus the int32 row
    counts exchanged first; its worst case is the dense figure.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, v in (("devices", devices), ("tensor_devices", tensor_devices)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    t_local = -(-tokens // devices)
    row_in = hidden * dtype_bytes + top_k * 8
    row_out = hidden * dtype_bytes
    if devices == 1:
        ep = 0
    elif strategy == "gather_scatter":
        # all_gather(x, ids, weights) + psum_scatter(y [T, H])
        ep = (devices - 1) * t_local * (row_in + row_out)
    else:
        rows = capacity(t_local, top_k, devices, capacity_factor)
        if ragged:
            if experts is None:
                raise ValueError("experts is needed for ragged all_to_all bytes")
            rows = min(rows, expected_rows_per_peer(t_local, top_k, devices, experts))
        ep = round((devices - 1) * rows * (row_in + row_out)) + ragged * (devices - 1) * 4
    # TP: psum of the [T_local, H] partial outputs (after the EP return)
    tp = 2 * (tensor_devices - 1) * t_local * row_out // tensor_devices
    return {"sent": ep + tp, "received": ep + tp}


def choose_strategy(tokens: int, *, devices: int, top_k: int,
                    capacity_factor: float | None = None, ragged: bool = False) -> str:
    """The "auto" rule: gather_scatter below AUTO_MIN_TOKENS_PER_DEVICE
    tokens per EP device; above it all_to_all where it moves fewer bytes:
    always when ragged (GPU: only routed rows travel), with dense all_to_all
    (CPU) only under a capacity below the worst case (capacity_factor * top_k
    < devices), since at the worst case both move the same bytes."""
    t_local = -(-tokens // max(devices, 1))
    if devices == 1 or t_local < AUTO_MIN_TOKENS_PER_DEVICE:
        return "gather_scatter"
    if ragged:
        return "all_to_all"
    c = capacity(t_local, top_k, devices, capacity_factor)
    return "all_to_all" if c < t_local else "gather_scatter"


def ragged_supported(mesh: Mesh) -> bool:
    """`lax.ragged_all_to_all` lowers on GPU and TPU, not on XLA:CPU."""
    return mesh.devices.flat[0].platform != "cpu"


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------

def _local_weights(template, arrays, num_experts, intermediate):
    return dataclasses.replace(template, num_experts=num_experts,
                               intermediate=intermediate, **arrays)


def _ep_local_ids(ids, experts_per_device, num_experts):
    # global ids -> (destination device, local id); out-of-range ids -> -1
    valid = (ids >= 0) & (ids < num_experts)
    dest = jnp.where(valid, ids // experts_per_device, -1)
    return dest, ids - dest * experts_per_device


def _exchange(blocks, axis, fill, ragged, n_send, n_recv):
    """blocks [De, C, ...]: block d to device d, received block s from device s.
    Ragged: only the first n_send[d] rows of each block travel; the rest of a
    received block holds ``fill`` (ids -1: routes nowhere)."""
    if not ragged:
        return jax.lax.all_to_all(blocks, axis, 0, 0, tiled=True)
    de, c = blocks.shape[:2]
    flat = blocks.reshape(de * c, *blocks.shape[2:])
    offsets = jnp.arange(de, dtype=jnp.int32) * c
    here = jnp.full((de,), jax.lax.axis_index(axis) * c, jnp.int32)
    out = jax.lax.ragged_all_to_all(flat, jnp.full_like(flat, fill), offsets, n_send, here,
                                    n_recv, axis_name=axis)
    return out.reshape(blocks.shape)


def moe(x, weights, topk_weights, topk_ids, *, mesh: Mesh, expert_axis: str | None = None,
        tensor_axis: str | None = None, strategy: str = "auto",
        capacity_factor: float | None = None, ragged: bool | None = None, **moe_kwargs):
    """`jax_mxfp4_moe.moe` over a device mesh; same arguments and result.

    ``weights`` come from `shard_weights` with the same mesh and axes.
    With ``expert_axis``, tokens (x, topk_*) are sharded over that axis
    (T is padded internally when the axis size does not divide it) and the
    result is too; with only ``tensor_axis`` they are replicated.
    ``strategy``: "gather_scatter", "all_to_all" or "auto"
    (`choose_strategy`). ``capacity_factor`` (all_to_all only) bounds the
    rows sent per destination (`capacity`); when given, the call returns
    ``(y, dropped)`` where ``dropped`` (int32) counts the (token, slot) pairs
    that did not fit and contributed nothing. Without it nothing can drop.
    ``ragged`` (all_to_all): send only the routed rows with
    `lax.ragged_all_to_all` instead of full capacity blocks with
    `lax.all_to_all`; default `ragged_supported(mesh)`. Same result.
    Other keyword arguments go to the single-device `moe` on every shard.
    """
    import jax_mxfp4_moe  # the single-device layer; imported late (package init)

    es, ts = mesh_sizes(mesh, expert_axis, tensor_axis)
    if "expert_mask" in moe_kwargs:
        raise ValueError("expert_mask is not supported by parallel.moe: the expert "
                         "axis decides which experts each device runs")
    check_weight_sharding(weights, mesh, expert_axis=expert_axis, tensor_axis=tensor_axis)
    if x.ndim != 2 or x.shape[1] != weights.hidden:
        raise ValueError(f"x must have shape [T, {weights.hidden}], got {x.shape}")
    if topk_ids.ndim != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must have shape [T={x.shape[0]}, k], got {topk_ids.shape}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have the shape of topk_ids {topk_ids.shape}, "
                         f"got {topk_weights.shape}")
    if ragged is None:
        ragged = ragged_supported(mesh)
    if strategy == "auto":
        strategy = choose_strategy(x.shape[0], devices=es, top_k=topk_ids.shape[1],
                                   capacity_factor=capacity_factor, ragged=ragged)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}")
    if capacity_factor is not None and strategy != "all_to_all":
        raise ValueError(f"capacity_factor applies to strategy 'all_to_all', not {strategy!r}")
    capacity(1, 1, 1, capacity_factor)  # validates the factor

    T, H = x.shape
    k = topk_ids.shape[1]
    dropped = jnp.zeros((), jnp.int32)
    if T == 0:
        y = jnp.zeros((0, H), x.dtype)
        return (y, dropped) if capacity_factor is not None else y

    E, I = weights.num_experts, weights.intermediate
    E_l, I_l = E // es, I // ts
    T_p = -(-T // es) * es
    topk_ids = topk_ids.astype(jnp.int32)
    topk_weights = topk_weights.astype(jnp.float32)
    if T_p != T:  # padding tokens route nowhere
        pad = T_p - T
        x = jnp.pad(x, ((0, pad), (0, 0)))
        topk_ids = jnp.pad(topk_ids, ((0, pad), (0, 0)), constant_values=-1)
        topk_weights = jnp.pad(topk_weights, ((0, pad), (0, 0)))
    T_l = T_p // es
    C = capacity(T_l, k, es, capacity_factor)

    arrays = weights.arrays()
    specs = weight_specs(expert_axis, tensor_axis)
    tok_spec = P(expert_axis, None)

    def local_moe(xs, tw, ids, w_arrays, expert_mask=None):
        if "b2" in w_arrays and tensor_axis is not None:
            # b2 once per token, not once per TP shard
            first = (jax.lax.axis_index(tensor_axis) == 0).astype(w_arrays["b2"].dtype)
            w_arrays = dict(w_arrays, b2=w_arrays["b2"] * first)
        lw = _local_weights(weights, w_arrays, E_l, I_l)
        if expert_mask is None:
            return jax_mxfp4_moe.moe(xs, lw, tw, ids, **moe_kwargs)
        return jax_mxfp4_moe.moe(xs, lw, tw, ids, expert_mask=expert_mask, **moe_kwargs)

    def tp_sum(y):
        return y if tensor_axis is None else jax.lax.psum(y, tensor_axis)

    def body_tp(xs, tw, ids, w_arrays):
        return tp_sum(local_moe(xs, tw, ids, w_arrays)), jnp.zeros((), jnp.int32)

    def body_gather_scatter(xs, tw, ids, w_arrays):
        xa = jax.lax.all_gather(xs, expert_axis, tiled=True)
        tw = jax.lax.all_gather(tw, expert_axis, tiled=True)
        ids = jax.lax.all_gather(ids, expert_axis, tiled=True)
        me = jax.lax.axis_index(expert_axis)
        mask = (jnp.arange(E) // E_l) == me  # experts of this device, in order
        y = local_moe(xa, tw, ids, w_arrays, expert_mask=mask)
        y = jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)
        return tp_sum(y), jnp.zeros((), jnp.int32)

    def body_all_to_all(xs, tw, ids, w_arrays):
        dest, local = _ep_local_ids(ids, E_l, E)           # [T_l, k]
        on = dest[:, :, None] == jnp.arange(es)[None, None, :]          # [T_l, k, De]
        has = on.any(axis=1)                                            # [T_l, De]
        pos = jnp.cumsum(has, axis=0) - 1                               # row in dest's block
        keep = has & (pos < C)
        dropped = jnp.sum(on & ~keep[:, None, :]).astype(jnp.int32)
        # src[d, c]: local token in row c of the block for device d (T_l = empty)
        d_idx = jnp.broadcast_to(jnp.arange(es)[None, :], (T_l, es))
        t_idx = jnp.broadcast_to(jnp.arange(T_l)[:, None], (T_l, es))
        src = jnp.full((es, C), T_l, jnp.int32).at[
            d_idx, jnp.where(keep, pos, C)].set(t_idx, mode="drop")
        x_pad = jnp.concatenate([xs, jnp.zeros((1, H), xs.dtype)])
        send_x = x_pad[src]                                             # [De, C, H]
        # per destination: that device's local ids for its slots, -1 elsewhere
        ids_d = jnp.where(on, local[:, :, None], -1)                   # [T_l, k, De]
        ids_pad = jnp.concatenate([ids_d, jnp.full((1, k, es), -1, jnp.int32)])
        send_ids = ids_pad[src, :, jnp.arange(es)[:, None]]             # [De, C, k]
        tw_pad = jnp.concatenate([tw, jnp.zeros((1, k), tw.dtype)])
        send_tw = tw_pad[src]                                           # [De, C, k]
        # block d of each buffer goes to device d and lands in block `me` there
        n_send = jnp.minimum(has.sum(axis=0), C).astype(jnp.int32)     # rows used per block
        n_recv = jax.lax.all_to_all(n_send, expert_axis, 0, 0, tiled=True) if ragged else None
        rx = _exchange(send_x, expert_axis, 0, ragged, n_send, n_recv)
        rids = _exchange(send_ids, expert_axis, -1, ragged, n_send, n_recv)
        rtw = _exchange(send_tw, expert_axis, 0, ragged, n_send, n_recv)
        z = local_moe(rx.reshape(es * C, H), rtw.reshape(es * C, k),
                      rids.reshape(es * C, k), w_arrays)
        back = _exchange(z.reshape(es, C, H), expert_axis, 0, ragged, n_recv, n_send)
        back = back.reshape(es * C, H)
        back = jnp.concatenate([back, jnp.zeros((1, H), back.dtype)])
        rows = jnp.where(keep, jnp.arange(es)[None, :] * C + pos, es * C)  # [T_l, De]
        y = back[rows].astype(jnp.float32).sum(axis=1).astype(xs.dtype)
        return tp_sum(y), jax.lax.psum(dropped, expert_axis)

    if expert_axis is None:
        body, tok_spec = body_tp, P()
    elif strategy == "gather_scatter":
        body = body_gather_scatter
    else:
        body = body_all_to_all
    w_specs = {n: specs[n] for n in arrays}
    f = _shard_map(body, mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_specs),
                   out_specs=(tok_spec, P()))
    y, dropped = f(x, topk_weights, topk_ids, arrays)
    y = y[:T]
    return (y, dropped) if capacity_factor is not None else y
