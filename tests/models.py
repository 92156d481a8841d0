"""Tiny random models of every supported family, shared by the test modules.

Three backends build them (the fixtures in ``tests/conftest.py`` hand them out):

* ``hooked`` — ``HookedTransformer``/``HookedEncoder`` from a config (TransformerLens 3.x only);
* ``native`` — ``TransformerBridge.boot_native`` from the same config fields (TL 3.9 and 4.x): the
  same tiny decoders as ``hooked`` on the Bridge, with TL-shaped weights, no Hugging Face model;
* ``bridge`` — a ``TransformerBridge`` around a Hugging Face model built from a config (no hub).
"""

from typing import Any

import torch

from tl_tensorlens._backend import bridge_from_hf, has_hooked_transformer

HAS_HOOKED = has_hooked_transformer()


def _has_native() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - a TL without the Bridge
        return False
    return hasattr(TransformerBridge, "boot_native")


HAS_NATIVE = _has_native()
#: Skip reasons, one per absent backend.
NO_HOOKED = "HookedTransformer/HookedEncoder exist only on TransformerLens 3.x"
NO_NATIVE = "TransformerBridge.boot_native is absent from this TransformerLens"

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


#: The HOOKED_CONFIGS families boot_native's NativeModel builds as configured. It has only standard and
#: rotary positions and gelu/gelu_new/relu/silu MLPs, and ignores ``window_size``,
#: ``original_architecture`` (Gemma's embedding scale, OLMo-2's post-norm) and attention sinks, so
#: those families stay HookedTransformer-only rather than being run under a misleading name.
NATIVE_FAMILIES: tuple[str, ...] = (
    "gpt2",
    "neox_parallel_partial_rotary",
    "gptj",
    "llama_gqa",
    "attn_only_ln",
    "attn_only_none",
    "norm_lnpre",
    "norm_rms",
    "norm_rmspre",
    "norm_none",
    "relu",
    "silu",
    "gelu_exact",
    "gated_gelu",
    "attn_result_split_qkv",
    "split_qkv_hook_mlp_in",
    "three_layers_gqa_bias",
)

#: Decoder backends built from HOOKED_CONFIGS fields, in the order tests are parametrized. A backend
#: the installed TL lacks is left out (not generated as a skip): TL 4.3 has no HookedTransformer, so a
#: ``[hooked-...]`` variant of a test is no test of that line. Tests that only make sense on one
#: backend use the ``hooked``/``native`` fixtures, which skip with NO_HOOKED/NO_NATIVE instead.
DECODER_BACKENDS: tuple[str, ...] = (("hooked",) if HAS_HOOKED else ()) + (("native",) if HAS_NATIVE else ())
#: Encoder backends: HookedEncoder (TL 3.x) and a BERT TransformerBridge (both lines).
ENCODER_BACKENDS: tuple[str, ...] = (("hooked",) if HAS_HOOKED else ()) + ("bridge",)


def on_hooked(*params: Any) -> list[Any]:
    """Parametrize values that need HookedTransformer/HookedEncoder, generated only where TL has them
    (splat into a parameter list: ``[*on_hooked("ht_gpt2"), "br_gpt2"]``); see DECODER_BACKENDS."""
    return list(params) if HAS_HOOKED else []


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


def native_model_cfg(dtype: torch.dtype = torch.float64, **overrides: Any) -> Any:
    """A tiny random ``TransformerBridge.boot_native`` model with HookedTransformerConfig-style
    overrides (works on TL 3.9 and 4.x; same init as :func:`hooked_model_cfg`)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    kw = {**_BASE, **overrides}
    torch.manual_seed(int(kw.get("seed") or 0))
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**kw), dtype=dtype)
    _init_finite(model, 0)
    return model.eval()


def native_model(name: str, dtype: torch.dtype = torch.float64) -> Any:
    """A tiny random ``boot_native`` Bridge of the named family (one of :data:`NATIVE_FAMILIES`)."""
    if name not in NATIVE_FAMILIES:
        raise ValueError(f"boot_native does not build the {name!r} family as configured")
    return native_model_cfg(dtype, **HOOKED_CONFIGS[name])


def decoder_model(backend: str, name: str = "gpt2", dtype: torch.dtype = torch.float64) -> Any:
    """The named HOOKED_CONFIGS family on ``backend`` ("hooked" or "native")."""
    return hooked_model(name, dtype) if backend == "hooked" else native_model(name, dtype)


def decoder_model_cfg(backend: str, dtype: torch.dtype = torch.float64, **overrides: Any) -> Any:
    """A tiny decoder with arbitrary config overrides on ``backend`` ("hooked" or "native")."""
    return hooked_model_cfg(dtype, **overrides) if backend == "hooked" else native_model_cfg(dtype, **overrides)


def family_params(names: "Any" = None) -> list[Any]:
    """``pytest.param(backend, family)`` pairs over :data:`DECODER_BACKENDS`; families boot_native
    does not build run on ``hooked`` only."""
    import pytest

    out = []
    for name in names if names is not None else sorted(HOOKED_CONFIGS):
        for backend in DECODER_BACKENDS:
            if backend == "native" and name not in NATIVE_FAMILIES:
                continue
            out.append(pytest.param(backend, name, id=f"{backend}-{name}"))
    return out


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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bridge_from_hf(hf_model(name, dtype))


def any_encoder(backend: str, dtype: torch.dtype = torch.float64) -> Any:
    """A tiny random BERT encoder on ``backend``: "hooked" (HookedEncoder) or "bridge" (BERT Bridge)."""
    return encoder_model(dtype) if backend == "hooked" else bridge_model("bert", dtype)


TOKENS = torch.tensor([[0, 5, 17, 8, 33, 21, 5, 17, 40, 12]])
