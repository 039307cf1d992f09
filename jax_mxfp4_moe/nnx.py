"""``MoE``: the layer as a Flax NNX module (``pip install "jax_mxfp4_moe[flax]"``).

    from jax_mxfp4_moe.nnx import MoE
    block = MoE.from_gpt_oss("/path/to/gpt-oss-120b", layer=3)   # router + experts
    y = block(x)                                                  # x [..., H]

The module holds

- the router: ``"gpt-oss"`` (logits = x W^T + b, the top k logits, softmax
  over those k), ``"deepseek-v3"`` (sigmoid scores, experts chosen by score +
  correction bias within the best groups, ``routing.sigmoid_group_topk``), or
  any callable ``router(x [T, H]) -> (topk_weights [T, k], topk_ids [T, k])``
  (an ``nnx.Module`` router is a submodule: its parameters train too);
- the MXFP4 experts as ``MXFP4Experts`` variables: quantised bytes, not
  ``nnx.Param``, so ``nnx.grad`` and ``nnx.Optimizer(..., wrt=nnx.Param)``
  leave them alone;
- the biases b1, b2 and the router's weight (and gpt-oss's router bias) as
  ``nnx.Param``: trainable, through ``moe``'s derivative in topk_weights,
  b1 and b2.  DeepSeek-V3's correction bias is a ``RoutingBias`` variable (it
  is updated by the load-balancing rule, not by gradient).

Every variable carries its sharding (``nnx.with_partitioning``): experts
over ``expert_axis`` (EP), the intermediate dim over ``tensor_axis`` (TP),
as ``parallel.weight_specs`` says; the router replicated.  With a ``mesh``
the module places its variables so at construction and runs
``jax_mxfp4_moe.parallel.moe`` (tokens are sharded over the expert axis
inside it); without one, ``jax_mxfp4_moe.moe``.  The router computes in
float32.  ``nnx.jit``, ``nnx.grad``, ``nnx.vmap`` (stacks of layers) and
``nnx.scan`` over stacked layers work.  Flax is imported by this module only.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mxfp4_moe import spec as layer_spec
from jax_mxfp4_moe.layer import api, layouts, parallel, routing
from jax_mxfp4_moe.layer.weights import MoEWeights

ROUTERS = ("gpt-oss", "deepseek-v3")
_EXPERT_ARRAYS = ("w1", "w1_scale", "w2", "w2_scale")


def _value(variable):
    """A variable's value (``get_value`` where flax has it: ``.value`` is deprecated)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


class MXFP4Experts(nnx.Variable):
    """MXFP4 expert weights (fp4 bytes or E8M0 scales): frozen, not a Param."""


class RoutingBias(nnx.Variable):
    """A bias that chooses experts without weighting them (DeepSeek-V3's
    correction bias): updated by a load-balancing rule, not by gradient."""


def _variable(cls, value, sharding, mesh):
    """cls(value) with its sharding annotation (the metadata nnx.with_partitioning
    sets).  With a mesh, flax places the value so (it already is); without one
    the annotation is kept for later (no eager placement, which needs a mesh)."""
    if mesh is not None:
        return cls(nnx.with_partitioning(lambda: value, tuple(sharding), mesh=mesh)())
    return cls(nnx.with_partitioning(lambda: value, tuple(sharding), eager_sharding=False)())


def auto_layout(spec: layer_spec.LayerSpec, device=None) -> str:
    """The weight layout the backend that ``moe`` picks on ``device`` (default:
    the default device) loads best: sm90 on Hopper, gfx950 on gfx950,
    canonical for the jnp path."""
    from jax_mxfp4_moe.layer import primitive

    path = primitive.choose_path(primitive.device_platform(device), spec, "auto")
    return layouts.CANONICAL if path == "jnp" else primitive.kernel_backend(path).LAYOUT_NAME


class MoE(nnx.Module):
    """A MoE FFN block: router and MXFP4 experts (module docstring).

    weights: MoEWeights (any layout; canonical under a mesh).  top_k: experts
    per token.  router: "gpt-oss", "deepseek-v3" or a callable.
    router_weight [E, H] / router_bias [E]: the router's parameters (random
    from ``rngs`` where absent; gpt-oss's bias starts at zero); for
    "deepseek-v3" router_bias is the correction bias (zero where absent) and
    num_groups, topk_groups, routed_scaling_factor its grouping.
    activation, quant, deterministic, backend: as ``jax_mxfp4_moe.moe``.
    mesh, expert_axis, tensor_axis, strategy: as ``parallel.moe``.
    """

    def __init__(self, weights: MoEWeights, *, top_k: int, router: str | Callable = "gpt-oss",
                 router_weight=None, router_bias=None, num_groups: int | None = None,
                 topk_groups: int | None = None, routed_scaling_factor: float = 1.0,
                 activation="silu", quant: str = layer_spec.DEFAULT_QUANT,
                 deterministic: bool = False, backend: str = "auto", mesh=None,
                 expert_axis: str | None = None, tensor_axis: str | None = None,
                 strategy: str = "auto", rngs: nnx.Rngs | None = None):
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights: expected MoEWeights, got {type(weights).__name__}")
        E, H = weights.num_experts, weights.hidden
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= E:
            raise ValueError(f"top_k: expected an int in [1, {E}], got {top_k!r}")
        self.spec = layer_spec.LayerSpec.for_weights(weights, int(top_k), activation=activation,
                                                     quant=quant)
        self.deterministic, self.backend = bool(deterministic), backend
        self.mesh, self.expert_axis, self.tensor_axis, self.strategy = (mesh, expert_axis,
                                                                        tensor_axis, strategy)
        if mesh is None and (expert_axis or tensor_axis):
            raise ValueError("expert_axis / tensor_axis need a mesh")
        if mesh is not None:  # places every array as weight_specs says
            weights = parallel.shard_weights(weights, mesh, expert_axis=expert_axis,
                                             tensor_axis=tensor_axis)
        specs = parallel.weight_specs(expert_axis, tensor_axis)
        for name in _EXPERT_ARRAYS:
            setattr(self, name, _variable(MXFP4Experts, getattr(weights, name),
                                          _spec_for(specs[name], getattr(weights, name)), mesh))
        for name in ("b1", "b2"):
            b = getattr(weights, name)
            setattr(self, name, None if b is None else _variable(nnx.Param, b, specs[name], mesh))
        # the static half of MoEWeights (gate_up may have changed in shard_weights)
        self.weight_fields = dict(num_experts=E, hidden=H, intermediate=weights.intermediate,
                                  gate_up=weights.gate_up, layout=weights.layout,
                                  scale_max=weights.scale_max)
        self._init_router(router, router_weight, router_bias, num_groups, topk_groups,
                          routed_scaling_factor, rngs)

    def _init_router(self, router, weight, bias, num_groups, topk_groups, scaling, rngs):
        E, H = self.spec.num_experts, self.spec.hidden
        if callable(router):
            self.router_kind, self.router = "custom", router
            self.router_weight = self.router_bias = None
            return
        if router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS} or a callable, got {router!r}")
        self.router_kind = router
        if weight is None:
            if rngs is None:
                raise ValueError("router_weight: absent, so rngs is needed to initialise it")
            weight = nnx.initializers.lecun_normal()(rngs.params(), (E, H), jnp.float32)
        weight = jnp.asarray(weight, jnp.float32)
        if weight.shape != (E, H):
            raise ValueError(f"router_weight: expected shape {(E, H)}, got {weight.shape}")
        bias = jnp.zeros((E,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
        if bias.shape != (E,):
            raise ValueError(f"router_bias: expected shape {(E,)}, got {bias.shape}")
        self.router_weight = _variable(nnx.Param, weight, (None, None), self.mesh)
        bias_cls = nnx.Param if router == "gpt-oss" else RoutingBias
        self.router_bias = _variable(bias_cls, bias, (None,), self.mesh)
        self.routing = None
        if router == "deepseek-v3":
            if num_groups is None or topk_groups is None:
                raise ValueError("deepseek-v3 router: num_groups and topk_groups are needed")
            self.routing = dict(num_groups=int(num_groups), topk_groups=int(topk_groups),
                                routed_scaling_factor=float(scaling))

    # ------------------------------------------------------------------ build

    @classmethod
    def random(cls, num_experts: int, top_k: int, hidden: int, intermediate: int, *,
               rngs: nnx.Rngs, gate_up: str = "interleaved", bias: bool = True,
               layout: str = layouts.CANONICAL, mesh=None, expert_axis=None, tensor_axis=None,
               **kwargs) -> "MoE":
        """Random valid MXFP4 experts (scales 2**-8..2**-4), small random biases
        and a random router: for tests and examples.  Traceable (nnx.vmap
        builds stacks of layers for nnx.scan)."""
        E, H, I = num_experts, hidden, intermediate
        arrays = _random_experts(rngs.params(), E, H, I, bool(bias))
        scale_max = arrays.pop("scale_max")
        try:
            scale_max = int(scale_max)
        except jax.errors.ConcretizationTypeError:  # built under a transform (nnx.vmap)
            scale_max = None
        w = MoEWeights(**arrays, num_experts=E, hidden=H, intermediate=I,
                       gate_up=layer_spec.check_gate_up(gate_up), scale_max=scale_max)
        w.validate()
        w = w.to_layout(layout)
        return cls(w, top_k=top_k, rngs=rngs, mesh=mesh, expert_axis=expert_axis,
                   tensor_axis=tensor_axis, **kwargs)

    @classmethod
    def from_gpt_oss(cls, checkpoint, layer: int, *, layout: str = "auto", progress=True,
                     top_k: int | None = None, **kwargs) -> "MoE":
        """gpt-oss's MoE block of ``layer``: router and experts from the
        checkpoint (a directory with ``model.safetensors.index.json``, files,
        or a mapping; ``layer.checkpoints``), top-k and the swiglu limit from
        its ``config.json`` (4 and 7.0 without one).  layout "auto": the one
        the default device's backend loads best (canonical under a mesh)."""
        from jax_mxfp4_moe.layer import checkpoints

        config = checkpoints.read_config(checkpoint) if not isinstance(checkpoint, dict) else {}
        if top_k is None:
            top_k = int(config.get("num_experts_per_tok", config.get("experts_per_token", 4)))
        activation = kwargs.pop("activation", layer_spec.Activation(
            "swiglu_oai", limit=float(config.get("swiglu_limit", 7.0))))
        ckpt = checkpoints.Checkpoint(checkpoint)
        if layout == "auto":
            if kwargs.get("mesh") is not None:
                layout = layouts.CANONICAL
            else:
                probe = layer_spec.LayerSpec(1, 1, 32, 32, activation, "interleaved",
                                             kwargs.get("quant", layer_spec.DEFAULT_QUANT))
                layout = auto_layout(probe)
        weights = checkpoints.from_gpt_oss(ckpt, layer, layout=layout, progress=progress)
        router_weight, router_bias = checkpoints.gpt_oss_router(ckpt, layer)
        return cls(weights, top_k=top_k, router="gpt-oss", router_weight=router_weight,
                   router_bias=router_bias, activation=activation, **kwargs)

    # ------------------------------------------------------------------ run

    @property
    def weights(self) -> MoEWeights:
        """The experts as MoEWeights (the variables' current values)."""
        arrays = {n: _value(getattr(self, n)) for n in _EXPERT_ARRAYS}
        for n in ("b1", "b2"):
            v = getattr(self, n)
            arrays[n] = None if v is None else _value(v)
        return MoEWeights(**arrays, **self.weight_fields)

    def route(self, x):
        """(topk_weights f32 [T, k], topk_ids i32 [T, k]) for tokens x [T, H]."""
        if self.router_kind == "custom":
            return self.router(x)
        logits = x.astype(jnp.float32) @ _value(self.router_weight).T
        k = self.spec.top_k
        if self.router_kind == "gpt-oss":
            return routing.topk_softmax(logits + _value(self.router_bias), k)
        return routing.sigmoid_group_topk(logits, k, bias=_value(self.router_bias), **self.routing)

    def __call__(self, x):
        """y = the block applied to x [..., H] (y: x's shape and dtype)."""
        *lead, H = x.shape
        if H != self.spec.hidden:
            raise ValueError(f"x: expected a last axis of {self.spec.hidden}, got shape {x.shape}")
        tokens = x.reshape(-1, H)
        topk_weights, topk_ids = self.route(tokens)
        kwargs = dict(activation=self.spec.activation, quant=self.spec.quant,
                      deterministic=self.deterministic, backend=self.backend)
        if self.mesh is None:
            y = api.moe(tokens, self.weights, topk_weights, topk_ids, **kwargs)
        else:
            y = parallel.moe(tokens, self.weights, topk_weights, topk_ids, mesh=self.mesh,
                             expert_axis=self.expert_axis, tensor_axis=self.tensor_axis,
                             strategy=self.strategy, **kwargs)
        return y.reshape(*lead, H)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _random_experts(key, E, H, I, bias):
    """MoE.random's arrays in one compiled program (eager ops compile one by one)."""
    k = jax.random.split(key, 6)
    u8 = lambda kk, s: jax.random.randint(kk, s, 0, 256, jnp.int32).astype(jnp.uint8)  # noqa: E731
    sc = lambda kk, s: jax.random.randint(kk, s, 119, 124, jnp.int32).astype(jnp.uint8)  # noqa: E731
    out = dict(w1=u8(k[0], (E, 2 * I, H // 2)), w1_scale=sc(k[1], (E, 2 * I, H // 32)),
               w2=u8(k[2], (E, H, I // 2)), w2_scale=sc(k[3], (E, H, I // 32)),
               b1=0.1 * jax.random.normal(k[4], (E, 2 * I), jnp.float32) if bias else None,
               b2=0.1 * jax.random.normal(k[5], (E, H), jnp.float32) if bias else None)
    out["scale_max"] = jnp.maximum(jnp.max(out["w1_scale"]), jnp.max(out["w2_scale"]))
    return out


def _spec_for(pspec, array):
    """A weight spec (parallel.weight_specs, 3 axes) over an array of any
    rank: backend layouts tile the trailing axes, which stay unsplit."""
    axes = tuple(pspec)
    return axes + (None,) * (array.ndim - len(axes))


__all__ = ["MoE", "MXFP4Experts", "RoutingBias", "ROUTERS", "auto_layout"]
