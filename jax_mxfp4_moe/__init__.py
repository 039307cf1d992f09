"""Mixture-of-Experts FFN layers with MXFP4 expert weights under jax.jit."""

from . import formats, layouts, parallel, reference, routing, sorting
from .api import moe
from .formats import (dequantize_mxfp4, dequantize_mxfp4_np, dequantize_mxfp8, dequantize_mxfp8_np,
                      quantize_mxfp4, quantize_mxfp4_np, quantize_mxfp8, quantize_mxfp8_np)
from .routing import sigmoid_group_topk, softmax_topk, topk_softmax
from .sorting import SortResult, moe_sort, sorted_size
from .validation import ACTIVATIONS, QUANT_MODES
from .weights import MoEWeights, from_gpt_oss, from_mxfp4, prepare_weights

__all__ = [
    "moe", "MoEWeights", "prepare_weights", "from_mxfp4", "from_gpt_oss",
    "moe_sort", "sorted_size", "SortResult",
    "softmax_topk", "topk_softmax", "sigmoid_group_topk",
    "quantize_mxfp4", "dequantize_mxfp4", "quantize_mxfp8", "dequantize_mxfp8",
    "quantize_mxfp4_np", "dequantize_mxfp4_np", "quantize_mxfp8_np", "dequantize_mxfp8_np",
    "ACTIVATIONS", "QUANT_MODES", "formats", "layouts", "parallel", "reference", "routing", "sorting",
]
