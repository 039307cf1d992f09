"""A synthetic gpt-oss checkpoint in the published format, written one expert at a time.

The names, dtypes, shapes and file layout of the Hugging Face gpt-oss
repositories: shards ``model-0000i-of-0000n.safetensors`` and
``model.safetensors.index.json`` (``weight_map``: tensor -> shard), a
``config.json``; per layer the router (``mlp.router.weight [E, H]``,
``.bias [E]``, bf16), the MXFP4 experts (``mlp.experts.gate_up_proj_blocks
[E, 2I, H/32, 16]`` u8, ``_scales [E, 2I, H/32]`` u8, ``_bias [E, 2I]`` bf16,
``down_proj_*`` likewise) and the layer norms; the embedding, final norm and
LM head (a small vocabulary).  Attention weights are left out: nothing here
reads them.  Values are random: fp4 bytes uniform, E8M0 scales 2**-8..2**-4,
small biases, a router scaled to give logits of order one.

Used by the tests (tiny shapes) and by ``examples/gpt_oss_moe.py --synthetic``
(a gpt-oss-120b-sized layer, to measure the loader's peak host memory):
nothing is ever whole in memory but one expert's tensor.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from jax_mxfp4_moe.layer import safetensors_io
from jax_mxfp4_moe.layer.checkpoints import CONFIG_FILE, GPT_OSS_PREFIX, GPT_OSS_ROUTER, INDEX_FILE

BF16 = np.dtype(ml_dtypes.bfloat16)
VOCAB = 64


def shard_name(i: int, shards: int) -> str:
    return f"model-{i:05d}-of-{shards - 1:05d}.safetensors"


def _expert_tensors(rng, layer, E, H, I):
    """name -> streamed tensor of one layer's experts (chunks drawn per expert)."""
    p = GPT_OSS_PREFIX.format(layer=layer)

    def blocks(n, k):
        return safetensors_io.streamed(np.uint8, (E, n, k // 32, 16), (
            np.frombuffer(rng.bytes(n * k // 2), np.uint8) for _ in range(E)))

    def scales(n, k):
        return safetensors_io.streamed(np.uint8, (E, n, k // 32), (
            rng.integers(119, 124, (n, k // 32), dtype=np.uint8) for _ in range(E)))

    def bias(n):
        return safetensors_io.streamed(BF16, (E, n), (
            (rng.standard_normal(n) * 0.1).astype(BF16) for _ in range(E)))

    return {p + "gate_up_proj_blocks": blocks(2 * I, H), p + "gate_up_proj_scales": scales(2 * I, H),
            p + "gate_up_proj_bias": bias(2 * I), p + "down_proj_blocks": blocks(H, I),
            p + "down_proj_scales": scales(H, I), p + "down_proj_bias": bias(H)}


def write_gpt_oss(directory, *, num_layers: int, num_experts: int, hidden: int, intermediate: int,
                  top_k: int = 4, shards: int = 2, seed: int = 0) -> dict:
    """Write the checkpoint into ``directory`` (created); layers are spread
    over ``shards`` files in order.  Returns the index written."""
    E, H, I = num_experts, hidden, intermediate
    if shards < 1 or shards > num_layers + 1:
        raise ValueError(f"shards: expected 1..{num_layers + 1}, got {shards}")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_shard = -(-num_layers // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        tensors = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = (rng.standard_normal((VOCAB, H)) * 0.02).astype(BF16)
        for layer in range(s * per_shard, min(num_layers, (s + 1) * per_shard)):
            r = GPT_OSS_ROUTER.format(layer=layer)
            tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(H, BF16)
            tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = np.ones(H, BF16)
            tensors[r + "weight"] = (rng.standard_normal((E, H)) / np.sqrt(H)).astype(BF16)
            tensors[r + "bias"] = (rng.standard_normal(E) * 0.1).astype(BF16)
            tensors.update(_expert_tensors(rng, layer, E, H, I))
        if s == shards - 1:
            tensors["model.norm.weight"] = np.ones(H, BF16)
            tensors["lm_head.weight"] = (rng.standard_normal((VOCAB, H)) * 0.02).astype(BF16)
        name = shard_name(s, shards)
        total += safetensors_io.write(os.path.join(directory, name), tensors,
                                      metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": num_layers, "num_local_experts": E,
              "num_experts_per_tok": top_k, "experts_per_token": top_k, "swiglu_limit": 7.0,
              "vocab_size": VOCAB, "quantization_config": {"quant_method": "mxfp4"}}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return index
