"""Frozen-state capture: one forward pass records every input-dependent coefficient.

TensorLens (Atad et al. 2026, arXiv 2601.17958, Sec. 3.2 and App. C) writes a transformer at a
fixed input as an exact affine map by freezing the quantities that make it nonlinear:

* attention patterns ``blocks.{l}.attn.hook_pattern`` (post-softmax, after masks, ALiBi, rotary,
  soft-caps and sinks);
* the scale of **every** norm (``*.hook_scale``: ln1, ln2, ln_final, Gemma-2/3 post-sublayer norms,
  SoLU's inner LN, BERT's embedding norm, q/k norms);
* MLP activations as data-dependent diagonals: plain MLPs ``r = act(pre) / pre`` (with the exact limit
  ``act'(0)`` where ``pre`` is 0 or denormal), gated MLPs the gate pre-activation itself
  (``act(gate)`` is then recomputed from the frozen value, no division), SoLU ``softmax(pre)``;
* any nonlinearity after the last hook (output-logit soft-cap, the BERT MLM-head GELU) as a ratio.

The :class:`FrozenState` also keeps the whole activation cache of that forward, so baselines and
plots can read attention patterns or residuals from the same capture without another pass.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens.errors import CaptureError, UnsupportedModelError

Backend = Literal["hooked", "encoder", "bridge"]
MlpKind = Literal["plain", "gated", "solu"]

#: act'(0) of every elementwise activation whose frozen ratio ``act(x)/x`` we support.
#: Used only where ``|pre|`` is below ``sqrt(tiny)`` (there the ratio loses precision or is 0/0).
ACTIVATION_SLOPE_AT_ZERO: dict[str, float] = {
    "gelu": 0.5,
    "gelu_new": 0.5,
    "gelu_fast": 0.5,
    "gelu_pytorch_tanh": 0.5,
    "gelu_python": 0.5,
    "gelu_accurate": 0.5,
    "quick_gelu": 0.5,
    "silu": 0.5,
    "swish": 0.5,
    "relu": 0.0,
    "relu2": 0.0,
    "relu6": 0.0,
    "tanh": 1.0,
    "mish": math.tanh(math.log(2.0)),
    "xielu": 0.5,
}

_ALLOWED_NORMS = {None, "LN", "LNPre", "RMS", "RMSPre"}


def detect_backend(model: Any) -> Backend:
    """Name the TransformerLens backend of ``model`` ("hooked", "encoder" or "bridge")."""
    name = type(model).__name__
    if name == "TransformerBridge" or any(c.__name__ == "TransformerBridge" for c in type(model).__mro__):
        return "bridge"
    if any(c.__name__ == "HookedEncoder" for c in type(model).__mro__):
        return "encoder"
    if any(c.__name__ == "HookedTransformer" for c in type(model).__mro__):
        return "hooked"
    raise UnsupportedModelError(
        {"model type": f"{name} is not a HookedTransformer, HookedEncoder or TransformerBridge"}
    )


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def check_supported(model: Any) -> None:
    """Refuse, by name, every model setting whose frozen replay cannot be exact.

    Raises:
        UnsupportedModelError: listing each offending config field and why.
    """
    cfg = model.cfg
    bad: dict[str, str] = {}
    if _cfg_get(cfg, "clip_qkv") is not None:
        bad["clip_qkv"] = "Q/K/V are clamped after hook_v with no hook: a hidden nonlinearity on the value path"
    if _cfg_get(cfg, "num_experts"):
        bad["num_experts"] = (
            "mixture-of-experts routing is input-dependent and re-routes every item of a batch of perturbed inputs"
        )
    norm = _cfg_get(cfg, "normalization_type")
    if norm not in _ALLOWED_NORMS:
        bad["normalization_type"] = f"{norm!r} is not one of LN, LNPre, RMS, RMSPre, None"
    if not _cfg_get(cfg, "gated_mlp", False) and not _cfg_get(cfg, "attn_only", False):
        act = _cfg_get(cfg, "act_fn")
        if act is not None and act not in ACTIVATION_SLOPE_AT_ZERO and act not in ("solu", "solu_ln"):
            bad["act_fn"] = f"{act!r} is not an elementwise activation this library knows the limit act'(0) of"
    if bad:
        raise UnsupportedModelError(bad)


def activation_ratio(
    pre: Float[Tensor, "*shape"], post: Float[Tensor, "*shape"], act_fn: str
) -> Float[Tensor, "*shape"]:
    """``act(pre)/pre`` elementwise, with the exact limit ``act'(0)`` where ``|pre|`` is tiny.

    Division is exact to an ulp wherever ``|pre| >= sqrt(tiny)``; below that (0, denormals) the ratio
    is replaced by ``act'(0)``, whose error ``|pre|·|act(pre)/pre - act'(0)|`` is far below rounding.
    """
    if act_fn not in ACTIVATION_SLOPE_AT_ZERO:
        raise UnsupportedModelError({"act_fn": f"{act_fn!r} has no known act'(0)"})
    tiny = math.sqrt(torch.finfo(pre.dtype).tiny)
    small = pre.abs() < tiny
    safe = torch.where(small, torch.ones_like(pre), pre)
    return torch.where(small, torch.full_like(pre, ACTIVATION_SLOPE_AT_ZERO[act_fn]), post / safe)


def block_output_hook(hook_names: Any, layer: int) -> str:
    """Hook name of block ``layer``'s output: BERT's post-LN blocks end at hook_normalized_resid_post."""
    normed = f"blocks.{layer}.hook_normalized_resid_post"
    if normed in hook_names:
        return normed
    return f"blocks.{layer}.hook_resid_post"


@dataclass(frozen=True)
class FrozenState:
    """Everything one forward pass froze, for one prompt (batch 1).

    Attributes:
        tokens: the prompt, ``[1, pos]``.
        activations: the full TransformerLens activation cache of that forward (batch dim 1 kept).
        frozen: hook name -> value the replay substitutes there (patterns, norm scales, MLP gates or
            ratios, SoLU softmax); batch dim 1, broadcast over any replay batch.
        mlp_kind: per layer, "plain", "gated" or "solu" (absent for attention-only layers).
        rebuild_z: layers whose ``hook_pattern`` is observational only (BERT on the Bridge delegates
            attention to Hugging Face), so the replay rebuilds ``hook_z = pattern @ v`` instead.
        logit_ratio: frozen ``softcap(z)/z`` applied after ``unembed.hook_out`` (None without a cap).
        head_act_ratio: frozen ratio of an unhooked activation inside an encoder's MLM head, keyed by
            module path (None when the model has none).
        unsupported_outputs: output point -> why the replay cannot be exact there (refused by name).
        backend: "hooked" (HookedTransformer), "encoder" (HookedEncoder) or "bridge".
        n_layers: number of blocks.
        logits: the model's own output logits for the prompt ``[1, pos, d_vocab]`` (None if the model
            returned none).
    """

    tokens: Int[Tensor, "1 pos"]
    activations: dict[str, Tensor]
    frozen: dict[str, Tensor]
    mlp_kind: dict[int, MlpKind]
    rebuild_z: frozenset[int]
    backend: Backend
    n_layers: int
    logit_ratio: Tensor | None = None
    head_act_ratio: dict[str, Tensor] = field(default_factory=dict)
    unsupported_outputs: dict[str, str] = field(default_factory=dict)
    logits: Tensor | None = None

    @property
    def n_pos(self) -> int:
        """Prompt length."""
        return int(self.tokens.shape[1])

    @property
    def x0(self) -> Float[Tensor, "pos d_model"]:
        """The block-0 input ``blocks.0.hook_resid_pre`` (embeddings, positions, embedding norm)."""
        return self.activations["blocks.0.hook_resid_pre"][0]

    def resid_pre(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """Input of block ``layer`` (``blocks.{layer}.hook_resid_pre``)."""
        return self.activations[f"blocks.{layer}.hook_resid_pre"][0]

    def block_output(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """Output of block ``layer`` (post-LN for BERT blocks)."""
        return self.activations[block_output_hook(self.activations, layer)][0]

    def pattern(self, layer: int) -> Float[Tensor, "head_index dest_pos src_pos"]:
        """Frozen attention pattern of ``layer``."""
        return self.frozen[f"blocks.{layer}.attn.hook_pattern"][0]

    @property
    def is_causal(self) -> bool:
        """True when every frozen pattern is lower-triangular, so output i depends only on inputs <= i.

        Read from the data rather than the config (the Bridge reports BERT as "causal").
        """
        n = self.n_pos
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        for layer in range(self.n_layers):
            pat = self.pattern(layer)
            if bool((pat[..., upper.to(pat.device)] != 0).any()):
                return False
        return True

    def prefix(self, n: int, keep: tuple[str, ...] = ()) -> "FrozenState":
        """The capture restricted to the first ``n`` positions.

        Exact for causal captures (every frozen pattern lower-triangular): output position ``i`` of
        the replay depends only on inputs ``<= i``, so ``T[i, :, j, :]`` of the prefix equals that of
        the whole prompt. ``keep`` names extra activations to carry (sliced); the residual-stream
        activations are always kept.
        """
        if not 1 <= n <= self.n_pos:
            raise CaptureError(f"prefix length {n} out of range 1..{self.n_pos}")

        def cut(name: str, v: Tensor) -> Tensor:
            if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
                return v[:, :, :n, :n]
            return v[:, :n]

        acts = {
            k: cut(k, v)
            for k, v in self.activations.items()
            if "hook_resid" in k or k.startswith("unembed.") or k in keep or k.endswith("hook_pattern")
        }
        return FrozenState(
            tokens=self.tokens[:, :n],
            activations=acts,
            frozen={k: cut(k, v) for k, v in self.frozen.items()},
            mlp_kind=self.mlp_kind,
            rebuild_z=self.rebuild_z,
            backend=self.backend,
            n_layers=self.n_layers,
            logit_ratio=None if self.logit_ratio is None else self.logit_ratio[:, :n],
            head_act_ratio={k: v[:, :n] for k, v in self.head_act_ratio.items()},
            unsupported_outputs=self.unsupported_outputs,
            logits=None if self.logits is None else self.logits[:, :n],
        )

    def __repr__(self) -> str:
        dtype = self.x0.dtype
        return (
            f"FrozenState(backend={self.backend}, n_layers={self.n_layers}, pos={self.n_pos}, "
            f"frozen={len(self.frozen)} hooks, dtype={dtype}, device={self.x0.device})"
        )


def _as_tokens(tokens: Any, model: Any) -> Tensor:
    if isinstance(tokens, str):
        if getattr(model, "tokenizer", None) is None:
            raise CaptureError("a string prompt needs model.tokenizer; pass token ids instead")
        tokens = model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise CaptureError(
            f"a FrozenState holds one prompt: tokens must be [pos] or [1, pos], got shape "
            f"{tuple(tokens.shape)}; capture each prompt of a batch separately"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        raise CaptureError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    return tokens.long()


_ACTIVATION_CLASS_HINTS = ("gelu", "activation", "relu", "silu", "tanh")


def _leaf_activations(
    root: torch.nn.Module, prefix: str, inside: tuple[str, ...] = ("",)
) -> dict[str, torch.nn.Module]:
    found: dict[str, torch.nn.Module] = {}
    for name, mod in root.named_modules():
        if list(mod.children()) or not any(k in name for k in inside):
            continue
        if any(k in type(mod).__name__.lower() for k in _ACTIVATION_CLASS_HINTS):
            found[f"{prefix}.{name}" if name else prefix] = mod
    return found


def _mlm_head_activations(model: Any) -> dict[str, torch.nn.Module] | None:
    """Leaf activation modules inside an encoder's MLM head (no HookPoint covers them).

    Returns None when the model has an MLM head whose activation could not be found (it may be a
    plain function call, as in RoBERTa's head): then nothing past the last block can be frozen.
    """
    if "mlm_head.hook_in" not in model.hook_dict and getattr(model, "mlm_head", None) is None:
        return {}
    if isinstance(getattr(model, "mlm_head", None), torch.nn.Module):
        found = _leaf_activations(model.mlm_head, "mlm_head")
        if found:
            return found
    # TransformerBridge wraps only the head's dense layer and LayerNorm; the activation between them
    # stays a module of the wrapped Hugging Face model (e.g. cls.predictions.transform.transform_act_fn).
    hf = getattr(model, "original_model", None)
    if isinstance(hf, torch.nn.Module):
        found = _leaf_activations(hf, "original_model", inside=("predictions", "lm_head"))
        if found:
            return found
    return None


def _detect_observational_patterns(
    model: Any, tokens: Tensor, cache: dict[str, Tensor], n_layers: int
) -> frozenset[int]:
    """Layers where editing ``hook_pattern`` does not change ``hook_z`` (pattern only observed)."""
    seen: dict[int, Tensor] = {}

    def zero_pattern(pattern: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(pattern)

    def record_z(z: Tensor, hook: Any) -> None:
        seen[int(hook.name.split(".")[1])] = z.detach()

    fwd: list[tuple[str, Any]] = []
    for layer in range(n_layers):
        if f"blocks.{layer}.attn.hook_z" not in cache:
            continue
        fwd.append((f"blocks.{layer}.attn.hook_pattern", zero_pattern))
        fwd.append((f"blocks.{layer}.attn.hook_z", record_z))
    if not fwd:
        return frozenset()
    with torch.no_grad(), warnings.catch_warnings(), model.hooks(fwd_hooks=fwd):
        # The Bridge warns that the probe's pattern edit was dropped: that is what is detected.
        warnings.filterwarnings("ignore", message=r"A hook on .*hook_pattern returned a modified tensor")
        model(tokens)
    layers = set()
    for layer, z in seen.items():
        if bool(z.abs().max() > 0):
            layers.add(layer)
    return frozenset(layers)


def capture(model: Any, tokens: Any) -> FrozenState:
    """Run ``model`` once on one prompt and freeze every input-dependent coefficient.

    Args:
        model: a ``HookedTransformer``, ``HookedEncoder`` (TL 3.x) or ``TransformerBridge``.
        tokens: one prompt, ``[pos]`` or ``[1, pos]`` token ids (or a string if the model has a
            tokenizer).

    Returns:
        The :class:`FrozenState` of that forward.

    Raises:
        UnsupportedModelError: the model has a setting the replay cannot make exact.
        CaptureError: bad tokens, or a needed hook did not fire.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> state = capture(HookedTransformer(cfg), torch.tensor([1, 2, 3]))
        >>> state.x0.shape
        torch.Size([3, 8])
    """
    backend = detect_backend(model)
    check_supported(model)
    tokens = _as_tokens(tokens, model)
    n_layers = int(model.cfg.n_layers)
    with torch.no_grad():
        logits, cache_obj = model.run_with_cache(tokens)
    cache: dict[str, Tensor] = {k: v.detach() for k, v in dict(cache_obj.items()).items()}
    if "blocks.0.hook_resid_pre" not in cache:
        raise CaptureError("hook 'blocks.0.hook_resid_pre' did not fire; cannot read the block-0 input")

    if any(k.endswith("hook_expert_weights") for k in cache):
        raise UnsupportedModelError(
            {"mlp.hook_expert_weights": "mixture-of-experts routing cannot be frozen for a batch"}
        )

    frozen: dict[str, Tensor] = {}
    for name, value in cache.items():
        # q/k norms only feed the (frozen) pattern, and their scale is flattened over
        # batch*pos*head, so it could not broadcast over a replay batch anyway.
        if name.endswith("q_norm.hook_scale") or name.endswith("k_norm.hook_scale"):
            continue
        if name.endswith("hook_scale") or name.endswith("attn.hook_pattern"):
            frozen[name] = value
    for layer in range(n_layers):
        if f"blocks.{layer}.attn.hook_pattern" not in cache:
            raise CaptureError(f"hook 'blocks.{layer}.attn.hook_pattern' did not fire (eager attention needed)")

    mlp_kind: dict[int, MlpKind] = {}
    act_fn = getattr(model.cfg, "act_fn", None)
    for layer in range(n_layers):
        p = f"blocks.{layer}.mlp."
        if p + "hook_pre" not in cache:
            continue
        if p + "hook_pre_linear" in cache:
            mlp_kind[layer] = "gated"
            frozen[p + "hook_pre"] = cache[p + "hook_pre"]
        elif p + "hook_mid" in cache:
            mlp_kind[layer] = "solu"
            frozen[p + "hook_mid"] = torch.softmax(cache[p + "hook_pre"], dim=-1)
        else:
            if p + "hook_post" not in cache:
                raise CaptureError(f"hook '{p}hook_post' did not fire; cannot freeze the MLP activation")
            if act_fn is None:
                raise UnsupportedModelError({"act_fn": "unknown activation of a plain MLP"})
            mlp_kind[layer] = "plain"
            if act_fn == "solu":
                # SoLU without its LN is x * softmax(x): the frozen diagonal is softmax(pre) itself.
                frozen[p + "hook_post"] = torch.softmax(cache[p + "hook_pre"], dim=-1)
            else:
                frozen[p + "hook_post"] = activation_ratio(cache[p + "hook_pre"], cache[p + "hook_post"], act_fn)

    logit_ratio = None
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0 and "unembed.hook_out" in cache:
        z = cache["unembed.hook_out"]
        tiny = math.sqrt(torch.finfo(z.dtype).tiny)
        small = z.abs() < tiny
        safe = torch.where(small, torch.ones_like(z), z)
        logit_ratio = torch.where(small, torch.ones_like(z), cap * torch.tanh(safe / cap) / safe)

    head_act_ratio: dict[str, Tensor] = {}
    unsupported_outputs: dict[str, str] = {}
    if backend in ("encoder", "bridge"):
        acts = _mlm_head_activations(model)
        if acts is None:
            unsupported_outputs.update(
                {
                    out: "the MLM head's activation (between its dense layer and LayerNorm) has no hook and "
                    "no module to freeze; use output='resid_post'"
                    for out in ("ln_final", "logits")
                }
            )
            acts = {}
        records: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        try:
            for name, mod in acts.items():

                def rec(mod: Any, inp: Any, out: Tensor, name: str = name) -> None:
                    records[name] = (inp[0].detach(), out.detach())

                handles.append(mod.register_forward_hook(rec))
            if handles:
                with torch.no_grad():
                    model(tokens)
        finally:
            for h in handles:
                h.remove()
        act_name = act_fn if act_fn in ACTIVATION_SLOPE_AT_ZERO else "gelu"
        for name, (inp, out) in records.items():
            head_act_ratio[name] = activation_ratio(inp, out, act_name)

    rebuild_z = _detect_observational_patterns(model, tokens, cache, n_layers)
    return FrozenState(
        tokens=tokens,
        activations=cache,
        frozen=frozen,
        mlp_kind=mlp_kind,
        rebuild_z=rebuild_z,
        backend=backend,
        n_layers=n_layers,
        logit_ratio=logit_ratio,
        head_act_ratio=head_act_ratio,
        unsupported_outputs=unsupported_outputs,
        logits=logits.detach() if isinstance(logits, Tensor) else None,
    )
