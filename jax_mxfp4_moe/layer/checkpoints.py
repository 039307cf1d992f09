"""Expert weights from model checkpoints (gpt-oss's MXFP4 safetensors)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jax_mxfp4_moe.layer import layouts
from jax_mxfp4_moe.layer.weights import MoEWeights, from_mxfp4
from jax_mxfp4_moe.numerics import formats


GPT_OSS_PREFIX = "model.layers.{layer}.mlp.experts."


def from_gpt_oss(tensors, layer: int, *, layout: str = layouts.CANONICAL) -> MoEWeights:
    """Build MoEWeights from gpt-oss checkpoint tensors of one layer.

    ``tensors`` is a mapping name -> array (e.g. ``safetensors.numpy.load_file``)
    or a path / list of paths of safetensors files.  gpt-oss stores
    ``gate_up_proj_blocks [E, 2I, H/32, 16]`` u8 (fp4 pairs, low nibble first),
    ``gate_up_proj_scales [E, 2I, H/32]`` u8 (E8M0), ``gate_up_proj_bias
    [E, 2I]`` with gate and up interleaved, and the same for ``down_proj``."""
    tensors = _load_tensors(tensors, layer)
    prefix = GPT_OSS_PREFIX.format(layer=layer)

    def get(name):
        key = prefix + name
        if key not in tensors:
            raise ValueError(f"tensors: missing {key!r}")
        return np.asarray(tensors[key])

    blocks1, blocks2 = get("gate_up_proj_blocks"), get("down_proj_blocks")
    for name, b in (("gate_up_proj_blocks", blocks1), ("down_proj_blocks", blocks2)):
        if b.ndim != 4 or b.shape[-1] != formats.MX_BLOCK // 2 or b.dtype != np.uint8:
            raise ValueError(f"tensors: {prefix}{name} must be uint8 [E, N, K/32, 16], got {b.dtype} {b.shape}")
    w1 = blocks1.reshape(*blocks1.shape[:2], -1)
    w2 = blocks2.reshape(*blocks2.shape[:2], -1)
    b1 = get("gate_up_proj_bias").astype(np.float32)
    b2 = get("down_proj_bias").astype(np.float32)
    return from_mxfp4(w1, get("gate_up_proj_scales"), w2, get("down_proj_scales"), b1, b2,
                      gate_up="interleaved", layout=layout)


def _load_tensors(tensors, layer):
    if isinstance(tensors, Mapping):
        return tensors
    from safetensors import safe_open  # optional: only for loading from files

    paths = [tensors] if isinstance(tensors, (str, bytes)) or hasattr(tensors, "__fspath__") else list(tensors)
    prefix = GPT_OSS_PREFIX.format(layer=layer)
    out = {}
    for path in paths:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key] = f.get_tensor(key)
    return out
