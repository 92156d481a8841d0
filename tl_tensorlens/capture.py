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

import hashlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens import _hooks
from tl_tensorlens._backend import ModelKind, block_output_hook, model_kind
from tl_tensorlens._deprecation import moved_names
from tl_tensorlens.errors import ArgumentError, CaptureError, StateMismatchError, UnsupportedModelError

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


# Config fields that do not change what the model computes on given token ids.
_CFG_IGNORED = frozenset(
    {
        "device",
        "n_devices",
        "seed",
        "model_name",
        "tokenizer_name",
        "tokenizer_prepends_bos",
        "default_prepend_bos",
        "from_checkpoint",
        "checkpoint_index",
        "checkpoint_label",
        "checkpoint_value",
        "init_weights",
        "init_mode",
        "initializer_range",
        "output_logits_soft_cap_is_applied",
    }
)
_SAMPLES = 64


def _config_items(model: Any) -> tuple[tuple[str, str], ...]:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return ()
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    items = []
    for k, v in sorted(raw.items()):
        if k in _CFG_IGNORED or k.startswith("_"):
            continue
        if isinstance(v, (bool, int, float, str, type(None), torch.dtype)) or (
            isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str, type(None))) for x in v)
        ):
            items.append((k, repr(v)))
    return tuple(items)


def _sample_digest(p: Tensor) -> str:
    flat = p.detach().reshape(-1)
    if flat.numel() == 0:
        return "empty"
    k = min(flat.numel(), _SAMPLES)
    # Integer spacing: a float linspace rounds the last index past the end for large tensors.
    idx = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
    vals = flat[idx].to(torch.float64).cpu().numpy().tobytes()
    return hashlib.sha1(vals).hexdigest()[:16]


def _versions(model: Any) -> tuple[tuple[int, int, str], ...]:
    return tuple((p._version, p.data_ptr(), str(p.dtype)) for _, p in model.named_parameters())


@dataclass(frozen=True)
class ModelSignature:
    """What a capture depends on, recorded at capture time (see :meth:`FrozenState.check_model`).

    Attributes:
        model_id: ``id()`` of the captured model object.
        kind: "hooked", "encoder" or "bridge".
        config: computation-relevant config fields ``(name, repr(value))``.
        params: per parameter ``(name, shape, dtype, digest of 64 evenly spaced entries)``.
        versions: per parameter ``(tensor version counter, data pointer, dtype)``: any in-place edit
            or reassignment of a weight changes it.
    """

    model_id: int
    kind: str
    config: tuple[tuple[str, str], ...]
    params: tuple[tuple[str, tuple[int, ...], str, str], ...]
    versions: tuple[tuple[int, int, str], ...] = field(repr=False)

    @property
    def digest(self) -> str:
        """A short hash of config and sampled weights (equal for equal models in any process)."""
        blob = repr((self.kind, self.config, self.params)).encode()
        return hashlib.sha1(blob).hexdigest()[:16]


def model_signature(model: Any) -> ModelSignature:
    """The :class:`ModelSignature` of ``model`` now (cost: 64 entries read per parameter)."""
    params = tuple((name, tuple(p.shape), str(p.dtype), _sample_digest(p)) for name, p in model.named_parameters())
    return ModelSignature(id(model), model_kind(model), _config_items(model), params, _versions(model))


def model_fingerprint(model: Any) -> str:
    """A hash of ``model``'s computation-relevant config and **every** weight (sha1 of the bytes).

    Stable across processes and loads of the same checkpoint; used to key stored results by model.
    Cost: one pass over the weights (about 1 s per GB).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> model_fingerprint(lin) == model_fingerprint(lin)
        True
    """
    h = hashlib.sha1(repr(_config_items(model)).encode())
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _signature_differences(then: ModelSignature, now: ModelSignature) -> list[str]:
    diffs: list[str] = []
    if then.kind != now.kind:
        diffs.append(f"model class {then.kind} vs {now.kind}")
    cfg_then, cfg_now = dict(then.config), dict(now.config)
    for k in sorted(set(cfg_then) | set(cfg_now)):
        if cfg_then.get(k) != cfg_now.get(k):
            diffs.append(f"cfg.{k}: {cfg_then.get(k, '<absent>')} vs {cfg_now.get(k, '<absent>')}")
    p_then = {p[0]: p for p in then.params}
    p_now = {p[0]: p for p in now.params}
    missing = sorted(set(p_then) - set(p_now))
    extra = sorted(set(p_now) - set(p_then))
    if missing:
        diffs.append(f"parameters absent now: {missing[:5]}")
    if extra:
        diffs.append(f"parameters not in the captured model: {extra[:5]}")
    changed = []
    for name in p_then.keys() & p_now.keys():
        a, b = p_then[name], p_now[name]
        if a[1] != b[1]:
            changed.append(f"{name} shape {a[1]} vs {b[1]}")
        elif a[2] != b[2]:
            changed.append(f"{name} dtype {a[2]} vs {b[2]}")
        elif a[3] != b[3]:
            changed.append(f"{name} values")
    if changed:
        diffs.append("weights differ: " + ", ".join(sorted(changed)[:5]) + (" ..." if len(changed) > 5 else ""))
    return diffs


@dataclass(frozen=True)
class FrozenState:
    """Everything one forward pass froze, for one prompt (batch 1).

    Attributes:
        tokens: the prompt, ``[1, pos]`` (``[B, pos]`` only inside :func:`capture_batch` and
            :func:`~tl_tensorlens.evaluation.attribution.stack_states`, whose batched replay broadcasts
            nothing: every frozen value has batch ``B`` too).
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
        signature: what the capture depends on (config, weights, dtype), checked by every replay
            (:meth:`check_model`); None for a state assembled by hand.
    """

    tokens: Int[Tensor, "batch pos"]
    activations: dict[str, Tensor]
    frozen: dict[str, Tensor]
    mlp_kind: dict[int, MlpKind]
    rebuild_z: frozenset[int]
    backend: ModelKind
    n_layers: int
    logit_ratio: Tensor | None = None
    head_act_ratio: dict[str, Tensor] = field(default_factory=dict)
    unsupported_outputs: dict[str, str] = field(default_factory=dict)
    logits: Tensor | None = None
    signature: ModelSignature | None = field(default=None, repr=False)

    def check_model(self, model: Any) -> None:
        """Refuse to replay this capture on a model it does not belong to.

        Passes at once for the captured model object with untouched weights. Another object passes
        when its config, parameter shapes, dtypes and sampled weights equal the captured ones (a
        reload of the same checkpoint).

        Raises:
            StateMismatchError: naming what differs (layer count, a config field, a weight's dtype or
                values), or saying that the captured model's weights were edited after the capture.
        """
        sig = self.signature
        if sig is None:
            return
        if id(model) == sig.model_id and _versions(model) == sig.versions:
            return
        now = model_signature(model)
        diffs = _signature_differences(sig, now)
        if not diffs:
            return
        same = id(model) == sig.model_id
        what = (
            "the captured model's weights changed after the capture" if same else "this model is not the one captured"
        )
        raise StateMismatchError(f"{what}: {'; '.join(diffs)}; capture the prompt again on this model")

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
            signature=self.signature,
        )

    def __repr__(self) -> str:
        dtype = self.x0.dtype
        return (
            f"FrozenState(backend={self.backend}, n_layers={self.n_layers}, pos={self.n_pos}, "
            f"frozen={len(self.frozen)} hooks, dtype={dtype}, device={self.x0.device})"
        )


def as_prompt_tokens(tokens: Any, model: Any) -> Int[Tensor, "1 pos"]:
    """One prompt as ``[1, pos]`` token ids, checked against the model's vocabulary and context.

    Accepts a non-empty string (needs ``model.tokenizer``; tokenized with ``model.to_tokens``, so TL
    decides about BOS), a list of ints, or an integer tensor ``[pos]`` / ``[1, pos]``.

    Raises:
        ArgumentError: None, an empty prompt, a batch of several prompts, non-integer ids, ids outside
            ``0..d_vocab-1`` (negative ids included: they would silently wrap), or more tokens than
            ``n_ctx``.
    """
    allowed = "one prompt: a non-empty string (with model.tokenizer) or integer token ids [pos] / [1, pos]"
    if tokens is None or isinstance(tokens, bytes):
        raise ArgumentError("tokens", tokens, allowed)
    if isinstance(tokens, str):
        if not tokens.strip():
            raise ArgumentError("tokens", tokens, "a non-empty prompt")
        if getattr(model, "tokenizer", None) is None:
            raise ArgumentError("tokens", tokens, "token ids: this model has no tokenizer (model.tokenizer is None)")
        tokens = model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError):
            raise ArgumentError("tokens", tokens, allowed) from None
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ArgumentError("tokens", f"a {tokens.dtype} tensor", "integer token ids (floats are not ids)")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ArgumentError(
            "tokens",
            f"a tensor of shape {tuple(tokens.shape)}",
            "[pos] or [1, pos]: a FrozenState holds one prompt (capture each prompt of a batch separately)",
        )
    n = int(tokens.shape[1])
    if n == 0:
        raise ArgumentError("tokens", "an empty prompt", "at least one token")
    d_vocab = int(model.cfg.d_vocab)
    bad = tokens[(tokens < 0) | (tokens >= d_vocab)]
    if bad.numel():
        raise ArgumentError("tokens", bad[:5].tolist(), f"token ids in 0..{d_vocab - 1} (d_vocab={d_vocab})")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    if n_ctx and n > n_ctx:
        raise ArgumentError("tokens", f"a prompt of {n} tokens", f"at most n_ctx={n_ctx} tokens")
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


#: Per model: (what the probe's answer depends on, the answer) of :func:`_detect_observational_patterns`.
_OBSERVATIONAL: "weakref.WeakKeyDictionary[Any, tuple[Any, frozenset[int]]]" = weakref.WeakKeyDictionary()


def _detect_observational_patterns(
    model: Any, tokens: Tensor, cache: dict[str, Tensor], n_layers: int
) -> frozenset[int]:
    """Layers where editing ``hook_pattern`` does not change ``hook_z`` (pattern only observed).

    Whether a layer's pattern is observational is a property of how the model computes attention
    (e.g. a BERT Bridge delegating it to Hugging Face), not of the prompt, so the probe forward runs
    once per model and configuration (keyed by the config, the Hugging Face attention implementation
    and the layers that have a ``hook_z``) and is reused by later captures.
    """
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    key = (
        _config_items(model),
        str(getattr(hf_config, "_attn_implementation", None)),
        tuple(layer for layer in range(n_layers) if f"blocks.{layer}.attn.hook_z" in cache),
    )
    try:
        known = _OBSERVATIONAL.get(model)
    except TypeError:  # not weak-referenceable: probe every time
        known = None
    if known is not None and known[0] == key:
        return known[1]
    found = _probe_observational_patterns(model, tokens, cache, n_layers)
    try:
        _OBSERVATIONAL[model] = (key, found)
    except TypeError:
        pass
    return found


def _probe_observational_patterns(
    model: Any, tokens: Tensor, cache: dict[str, Tensor], n_layers: int
) -> frozenset[int]:
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
    with torch.no_grad():
        # The Bridge warns that the probe's pattern edit was dropped: that is what is detected.
        _hooks.run(model, tokens, fwd)
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
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> state = capture(TransformerBridge.boot_native(cfg).eval(), torch.tensor([1, 2, 3]))
        >>> state.x0.shape
        torch.Size([3, 8])
    """
    # A capture taken under torch.inference_mode must still be differentiable (the engine takes
    # vector-Jacobian products through the frozen values), so none of its tensors is an inference tensor.
    with torch.inference_mode(False):
        return _capture(model, tokens)


def capture_batch(model: Any, tokens: Any) -> list[FrozenState]:
    """:func:`capture` of ``B`` prompts of equal length in ONE forward: ``tokens [B, pos]`` -> ``B``
    captures (each equals ``capture(model, tokens[b])`` up to rounding: the forward is batched).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> [s.n_pos for s in capture_batch(HookedTransformer(cfg), torch.tensor([[1, 2, 3], [4, 5, 6]]))]
        [3, 3]
    """
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ArgumentError("tokens", tokens, "an integer tensor [batch, pos] of equal-length prompts")
    rows = torch.cat([as_prompt_tokens(t, model) for t in tokens])
    with torch.inference_mode(False):
        return split_state(_capture(model, rows, batched=True))


def split_state(state: FrozenState) -> list[FrozenState]:
    """The per-prompt captures of a capture of a batch (every batched tensor sliced ``[b : b + 1]``)."""

    n_batch = int(state.tokens.shape[0])

    def cut(b: int, v: Tensor | None) -> Any:
        return None if v is None else v[b : b + 1]

    return [
        FrozenState(
            tokens=state.tokens[b : b + 1],
            # (a cache entry flattened over batch*pos, e.g. a q/k-norm scale, is not kept)
            activations={k: v[b : b + 1] for k, v in state.activations.items() if v.shape[:1] == (n_batch,)},
            frozen={k: v[b : b + 1] for k, v in state.frozen.items()},
            mlp_kind=state.mlp_kind,
            rebuild_z=state.rebuild_z,
            backend=state.backend,
            n_layers=state.n_layers,
            logit_ratio=cut(b, state.logit_ratio),
            head_act_ratio={k: v[b : b + 1] for k, v in state.head_act_ratio.items()},
            unsupported_outputs=state.unsupported_outputs,
            logits=cut(b, state.logits),
            signature=state.signature,
        )
        for b in range(n_batch)
    ]


def _capture(model: Any, tokens: Any, batched: bool = False) -> FrozenState:
    backend = model_kind(model)
    check_supported(model)
    if _hooks.frozen_replay_active(model):
        raise StateMismatchError(
            "capture() was called while a frozen replay (e.g. a linearized(...) block) has its hooks on this "
            "model: the capture would record the frozen values, not the model's; capture outside the block"
        )
    if not batched:
        tokens = as_prompt_tokens(tokens, model)
    n_layers = int(model.cfg.n_layers)
    signature = model_signature(model)
    head_acts = _mlm_head_activations(model) if backend in ("encoder", "bridge") else {}
    with _hooks.model_lock(model), torch.no_grad(), _hooks.recording_modules(model, list(head_acts or {})) as records:
        # TL's own caching forward: its hooks live and die inside run_with_cache. The MLM head's
        # activation (no TL hook point) is recorded by module hooks during the same forward.
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
        if head_acts is None:
            unsupported_outputs.update(
                {
                    out: "the MLM head's activation (between its dense layer and LayerNorm) has no hook and "
                    "no module to freeze; use output='resid_post'"
                    for out in ("ln_final", "logits")
                }
            )
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
        signature=signature,
    )


__getattr__ = moved_names(
    __name__,
    {
        "detect_backend": "tl_tensorlens._backend:model_kind",
        "Backend": "tl_tensorlens._backend:ModelKind",
    },
)

__all__ = [
    "ACTIVATION_SLOPE_AT_ZERO",
    "FrozenState",
    "MlpKind",
    "ModelSignature",
    "activation_ratio",
    "as_prompt_tokens",
    "capture",
    "capture_batch",
    "check_supported",
    "model_fingerprint",
    "model_signature",
    "split_state",
]
