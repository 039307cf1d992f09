"""Weight layouts: how MoEWeights' arrays are arranged in memory.

The canonical layout (docs/ARCHITECTURE.md) is what ``prepare_weights``
produces and what the jnp path and the reference read.  A backend may register
a layout its kernels load best (a swizzle of fp4 values and scales, padding
to its K granularity).  Each layout owns both directions; ``unpack`` must be
the exact inverse of ``pack`` and both must be jnp-traceable.

Dict keys: ``w1, w1_scale, w2, w2_scale`` (+ ``b1``, ``b2`` when present);
``unpack`` also takes one matrix alone (``w1, w1_scale`` or ``w2, w2_scale``).
"""

from __future__ import annotations

import importlib
from typing import Protocol

CANONICAL = "canonical"
# Modules that register backend layouts when imported.
_PROVIDERS = ("jax_mxfp4_moe.cuda.layout", "jax_mxfp4_moe.rocm.layout")


class Layout(Protocol):
    name: str

    def pack(self, canon: dict, *, num_experts: int, hidden: int, intermediate: int) -> dict: ...

    def unpack(self, arrays: dict, *, num_experts: int, hidden: int, intermediate: int) -> dict: ...


class _Canonical:
    name = CANONICAL

    def pack(self, canon, **dims):
        return dict(canon)

    def unpack(self, arrays, **dims):
        return dict(arrays)


_REGISTRY: dict[str, Layout] = {CANONICAL: _Canonical()}


def register(layout: Layout) -> None:
    _REGISTRY[layout.name] = layout


def get(name: str) -> Layout:
    if name not in _REGISTRY:
        for module in _PROVIDERS:
            try:
                importlib.import_module(module)
            except ImportError:
                pass
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"layout: unknown weight layout {name!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)
