"""Mixture-of-Experts FFN layers with MXFP4 expert weights under jax.jit."""

from jax_mxfp4_moe import spec
from jax_mxfp4_moe.layer import layouts, parallel, routing
from jax_mxfp4_moe.layer.api import moe
from jax_mxfp4_moe.layer.checkpoints import from_gpt_oss
from jax_mxfp4_moe.layer.routing import sigmoid_group_topk, softmax_topk, topk_softmax
from jax_mxfp4_moe.layer.weights import MoEWeights, from_mxfp4, prepare_weights
from jax_mxfp4_moe.numerics import formats, reference, sorting
from jax_mxfp4_moe.numerics.formats import (dequantize_mxfp4, dequantize_mxfp4_np, dequantize_mxfp8,
                                            dequantize_mxfp8_np, quantize_mxfp4, quantize_mxfp4_np,
                                            quantize_mxfp8, quantize_mxfp8_np)
from jax_mxfp4_moe.numerics.sorting import SortResult, moe_sort, sorted_size
from jax_mxfp4_moe.spec import Activation, LayerSpec

ACTIVATIONS = tuple(spec.ACTIVATION_KINDS)
QUANT_MODES = tuple(spec.QUANT_MODES)

__all__ = [
    "moe", "MoEWeights", "prepare_weights", "from_mxfp4", "from_gpt_oss", "Activation", "LayerSpec",
    "moe_sort", "sorted_size", "SortResult",
    "softmax_topk", "topk_softmax", "sigmoid_group_topk",
    "quantize_mxfp4", "dequantize_mxfp4", "quantize_mxfp8", "dequantize_mxfp8",
    "quantize_mxfp4_np", "dequantize_mxfp4_np", "quantize_mxfp8_np", "dequantize_mxfp8_np",
    "ACTIVATIONS", "QUANT_MODES", "formats", "layouts", "parallel", "reference", "routing", "sorting",
    "spec",
]
