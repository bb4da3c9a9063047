"""Tiny random-initialised models of every cache layout transformers 5.x builds.

The architecture matrix of the tests and of ``kvstore bench models``: each model is
one of transformers' own classes with a small config (fp32, eval mode, 2-3 layers,
hidden 64, vocab 512, seed-0 weights; nothing downloaded). Sliding windows are 16
tokens so that a prompt of a few chunks exceeds them; hybrid models have at least one
sliding (or linear) and one full-attention layer; GPT-OSS runs eager attention (sdpa
ignores its sinks). ``tiny_model(arch, **overrides)`` changes any config entry.
"""

from __future__ import annotations

from typing import Any

import torch

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,  # no early stop in generate() tests
    tie_word_embeddings=False,
)
WINDOW = 16
_SW, _FA = "sliding_attention", "full_attention"

# arch -> (transformers config class, model class, config overrides); classes resolved on use
_SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_hidden_layers=2, sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=[_SW, _FA], query_pre_attn_scalar=16),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(num_hidden_layers=3, sliding_window=WINDOW, layer_types=[_SW, _SW, _FA], query_pre_attn_scalar=16),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_hidden_layers=2)),
    "cohere2": (
        "Cohere2Config",
        "Cohere2ForCausalLM",
        dict(num_hidden_layers=2, sliding_window=WINDOW, layer_types=[_SW, _FA]),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_hidden_layers=2,
            sliding_window=WINDOW,
            layer_types=[_SW, _FA],
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=64,
            max_position_embeddings=131072,  # = yarn factor 32 * original 4096; avoids a YaRN mismatch warning
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=2,
            num_key_value_heads=4,  # MLA: KV heads == query heads after up-projection
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            head_dim=8,  # == qk_rope_head_dim (used for the rotary embedding size)
            first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=32,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
    ),
}

ARCHS: list[str] = list(_SPECS)


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The tiny config of ``arch`` (one of :data:`ARCHS`), with ``overrides`` applied."""
    import transformers

    config_cls, _, defaults = _SPECS[arch]
    return getattr(transformers, config_cls)(**{**_COMMON, **defaults, **overrides, "attn_implementation": "eager"})


def tiny_model(arch: str, **overrides: Any) -> torch.nn.Module:
    """The tiny fp32 model of ``arch`` with seed-0 random weights, in eval mode (the
    caller's random state is left as it was)."""
    import transformers

    model_cls = getattr(transformers, _SPECS[arch][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_cls(tiny_config(arch, **overrides)).to(torch.float32).eval()
