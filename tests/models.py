"""Tiny random models of every supported family, shared by the test modules.

HookedTransformer/HookedEncoder configs exist only on TransformerLens 3.x; the Bridge factories
build Hugging Face models from configs (no hub) and work on 3.9 and 4.3.
"""

from typing import Any

import torch

from tl_tensorlens._backend import bridge_from_hf, has_hooked_transformer

HAS_HOOKED = has_hooked_transformer()

_BASE: dict[str, Any] = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=53, n_ctx=24, act_fn="gelu_new", seed=0
)

#: name -> HookedTransformerConfig overrides; covers every family the replay promises to be exact on.
HOOKED_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(normalization_type="LN", positional_embedding_type="standard"),
    "neox_parallel_partial_rotary": dict(
        parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4, act_fn="gelu"
    ),
    "gptj": dict(parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=True),
    "llama_gqa": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        positional_embedding_type="rotary",
        final_rms=True,
    ),
    "mistral_sliding_window": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        positional_embedding_type="rotary",
        window_size=3,
        attn_types=["local", "local"],
        final_rms=True,
    ),
    "gemma1": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="gelu_new",
        positional_embedding_type="rotary",
        original_architecture="GemmaForCausalLM",
    ),
    "gemma2_softcaps_sandwich": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        positional_embedding_type="rotary",
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        original_architecture="Gemma2ForCausalLM",
    ),
    "gemma3_qk_norm": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
        positional_embedding_type="rotary",
        use_normalization_before_and_after=True,
        use_qk_norm=True,
        original_architecture="Gemma3ForCausalLM",
    ),
    "olmo2_post_norm": dict(
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        positional_embedding_type="rotary",
        original_architecture="Olmo2ForCausalLM",
    ),
    "bloom_alibi": dict(positional_embedding_type="alibi", act_fn="gelu"),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "solu": dict(act_fn="solu_ln"),
    "attn_only_ln": dict(attn_only=True),
    "attn_only_none": dict(attn_only=True, normalization_type=None),
    "norm_lnpre": dict(normalization_type="LNPre"),
    "norm_rms": dict(normalization_type="RMS"),
    "norm_rmspre": dict(normalization_type="RMSPre"),
    "norm_none": dict(normalization_type=None),
    "relu": dict(act_fn="relu"),
    "silu": dict(act_fn="silu"),
    "gelu_exact": dict(act_fn="gelu"),
    "relu2": dict(act_fn="relu2"),
    "gated_gelu": dict(gated_mlp=True, act_fn="gelu"),
    "attention_sinks": dict(use_attention_sinks=True),
    "attn_result_split_qkv": dict(use_attn_result=True, use_split_qkv_input=True),
    "split_qkv_hook_mlp_in": dict(use_split_qkv_input=True, use_hook_mlp_in=True),
    "three_layers_gqa_bias": dict(n_layers=3, n_key_value_heads=2, normalization_type="LN"),
}


def _init_finite(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter finite values and non-trivial biases (fresh TL modules leave some
    parameters uninitialised or zero, which would hide bias bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all() or name.split(".")[-1].startswith("b") or "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
            if name.endswith(".w") and p.ndim == 1:  # norm gains: away from 1 so they matter
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def hooked_model(name: str, dtype: torch.dtype = torch.float64) -> Any:
    """A tiny random HookedTransformer of the named family (TL 3.x only)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kw = {**_BASE, **HOOKED_CONFIGS[name], "dtype": dtype}
    model = HookedTransformer(HookedTransformerConfig(**kw))
    _init_finite(model, 0)
    return model.eval()


def hooked_model_cfg(dtype: torch.dtype = torch.float64, **overrides: Any) -> Any:
    """A tiny random HookedTransformer with arbitrary config overrides (TL 3.x only)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**{**_BASE, "dtype": dtype, **overrides}))
    _init_finite(model, 0)
    return model.eval()


def encoder_model(dtype: torch.dtype = torch.float64, **overrides: Any) -> Any:
    """A tiny random BERT HookedEncoder, with optional config overrides (TL 3.x only).

    ``HookedEncoder(cfg)`` leaves some parameters as uninitialised memory (finite but possibly
    huge), so every parameter is re-drawn here from a seeded generator.
    """
    from transformer_lens import HookedEncoder, HookedTransformerConfig

    kw = {
        **_BASE,
        "act_fn": "gelu",
        "attention_dir": "bidirectional",
        "original_architecture": "BertForMaskedLM",
        "dtype": dtype,
        **overrides,
    }
    model = HookedEncoder(HookedTransformerConfig(**kw))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim >= 2:
                fan_in = p.shape[-2] if p.ndim == 2 else p.shape[-2]
                p.copy_((z / fan_in**0.5).to(p.dtype))
            elif name.endswith(".w"):
                p.copy_((1 + 0.2 * z).to(p.dtype))
            else:
                p.copy_((0.1 * z).to(p.dtype))
    return model.eval()


BRIDGE_FAMILIES = ("gpt2", "neox", "llama_gqa", "gemma2", "gemma3", "bert")


def hf_model(name: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A tiny random Hugging Face model of the named family, built from a config (no hub)."""
    import transformers as tr

    size = dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=24
    )
    gemma = dict(size, num_key_value_heads=2, head_dim=8, sliding_window=4)
    families = {
        "gpt2": (tr.GPT2LMHeadModel, tr.GPT2Config, dict(n_layer=2, n_embd=32, n_head=4, n_positions=24)),
        "neox": (tr.GPTNeoXForCausalLM, tr.GPTNeoXConfig, dict(size, rotary_pct=0.5)),
        "llama_gqa": (tr.LlamaForCausalLM, tr.LlamaConfig, dict(size, num_key_value_heads=2)),
        "gemma2": (tr.Gemma2ForCausalLM, tr.Gemma2Config, gemma),
        "gemma3": (tr.Gemma3ForCausalLM, tr.Gemma3TextConfig, gemma),
        "bert": (tr.BertForMaskedLM, tr.BertConfig, size),
    }
    model_cls, config_cls, kw = families[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw, vocab_size=53, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    model = model.to(dtype).eval()
    _init_finite(model, 2)
    return model


def bridge_model(name: str, dtype: torch.dtype = torch.float64) -> Any:
    """A TransformerBridge around :func:`hf_model` (works on TL 3.9 and 4.3)."""
    return bridge_from_hf(hf_model(name, dtype))


TOKENS = torch.tensor([[0, 5, 17, 8, 33, 21, 5, 17, 40, 12]])
