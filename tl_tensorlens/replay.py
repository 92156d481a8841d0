"""The frozen replay: the model with its captured coefficients substituted, exactly affine in its input.

Every hook is installed through the read/feed primitives of :mod:`tl_tensorlens._hooks` (re-exported
here: :func:`record`, :func:`feed`, :func:`stop_at`, :class:`StopForward`), each inside a context, so
no hook survives a replay, even one that raises midway. No other module installs hooks.

Given a :class:`~tl_tensorlens.capture.FrozenState` captured at input ``x0``, the replay feeds any
``X`` of shape ``[batch, pos, d_model]`` at ``blocks.{start}.hook_resid_pre`` and reads the output at
a chosen point. With every input-dependent coefficient frozen it computes ``F(X) = T vec(X) + c``
(TensorLens Eq. 18-19, App. B), and ``F(x0)`` is the model's own output. ``T`` is the Jacobian of
this replay (App. C, Eq. 27), which is how :mod:`tl_tensorlens.tensors` computes every tensor.

One replay serves every backend: HookedTransformer, HookedEncoder and TransformerBridge share the
hook names used here; the differences (BERT's post-LN block output, BERT-on-Bridge attention whose
``hook_pattern`` only observes) are read from the model and the capture at run time.
"""

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens._backend import OUTPUT_POINTS, OutputPoint, block_output_hook, float32_norms_in_float64
from tl_tensorlens._checks import as_heads, as_layer_range
from tl_tensorlens._hooks import HookList, ModuleHookList, StopForward, feed, hooks_on, record, stop_at
from tl_tensorlens.capture import FrozenState, capture
from tl_tensorlens.errors import ArgumentError, ReplayError, UnsupportedModelError, VerificationError


@dataclass(frozen=True)
class ReplaySpec:
    """Which part of the model a replay covers.

    Attributes:
        output: "resid_post" (output of block ``stop - 1``), "ln_final" (the unembedding input, after
            ``ln_final`` with its weights) or "logits".
        start: first block; the input is fed at ``blocks.{start}.hook_resid_pre``.
        stop: one past the last block (None = all blocks).
        heads: per layer, the heads kept; every other head of that layer is zeroed (its pattern is
            replaced by 0). None keeps all heads. Layers not named keep all their heads.
    """

    output: OutputPoint = "resid_post"
    start: int = 0
    stop: int | None = None
    heads: Mapping[int, Sequence[int]] | None = None

    def resolved(self, state: FrozenState) -> "ReplaySpec":
        """Check the spec against a capture and fill ``stop``.

        Raises:
            ArgumentError: unknown output point, a layer range outside ``0..n_layers``, heads that
                are not ``{layer: [head, ...]}`` inside the range, an output after ``ln_final`` with
                a range that does not end at the last block.
            UnsupportedModelError: the output point cannot be made exact on this model.
        """
        n = state.n_layers
        if not isinstance(self.output, str) or self.output not in OUTPUT_POINTS:
            raise ArgumentError("output", self.output, f"one of {OUTPUT_POINTS}")
        start, stop = as_layer_range((self.start, self.stop), n)
        if self.output in state.unsupported_outputs:
            raise UnsupportedModelError({f"output={self.output!r}": state.unsupported_outputs[self.output]})
        if self.output != "resid_post" and stop != n:
            raise ArgumentError(
                "layers",
                (start, stop),
                f"a range ending at the last block (stop={n}) for output={self.output!r}, which reads after ln_final",
                "use output='resid_post' for a partial range",
            )
        heads = as_heads(self.heads, n, int(state.pattern(0).shape[0]), (start, stop))
        return ReplaySpec(self.output, start, stop, heads)


def _expand(value: Tensor, act: Tensor, hook_name: str) -> Tensor:
    """Broadcast a batch-1 frozen value to the live activation's batch, refusing shape mismatches."""
    if value.shape[1:] != act.shape[1:]:
        raise ReplayError(
            f"hook '{hook_name}': frozen value has shape {tuple(value.shape)} but the replay produced "
            f"{tuple(act.shape)}; the replay input must have the captured prompt's length"
        )
    return value.to(act.dtype).expand(act.shape[0], *value.shape[1:])


def _head_mask(state: FrozenState, spec: ReplaySpec, layer: int) -> Tensor | None:
    if spec.heads is None or layer not in spec.heads:
        return None
    pat = state.pattern(layer)
    mask = torch.zeros(pat.shape[0], dtype=pat.dtype, device=pat.device)
    mask[list(spec.heads[layer])] = 1
    return mask[None, :, None, None]


def frozen_hooks(model: Any, state: FrozenState, spec: ReplaySpec | None = None) -> HookList:
    """Hooks that substitute every frozen value (the input is left to the caller).

    Usable directly in ordinary TransformerLens calls, e.g.
    ``model.run_with_hooks(tokens, fwd_hooks=frozen_hooks(model, state))`` runs the linearized
    model on ``tokens`` (of the captured length).
    """
    state.check_model(model)
    spec = (spec or ReplaySpec()).resolved(state)
    hooks: HookList = []
    stash: dict[str, Tensor] = {}

    for name, value in state.frozen.items():
        if name.endswith("hook_scale"):
            hooks.append((name, _substitute(value)))

    for layer in range(state.n_layers):
        pname = f"blocks.{layer}.attn.hook_pattern"
        pattern = state.frozen[pname]
        mask = _head_mask(state, spec, layer)
        if mask is not None:
            pattern = pattern * mask
        if layer in state.rebuild_z:
            hooks.append((f"blocks.{layer}.attn.hook_v", _stasher(stash, f"v{layer}")))
            hooks.append((f"blocks.{layer}.attn.hook_z", _rebuild_z(pattern, stash, f"v{layer}")))
        else:
            hooks.append((pname, _substitute(pattern)))

        kind = state.mlp_kind.get(layer)
        p = f"blocks.{layer}.mlp."
        if kind == "gated":
            hooks.append((p + "hook_pre", _substitute(state.frozen[p + "hook_pre"])))
        elif kind == "solu":
            hooks.append((p + "hook_mid", _scale_live(state.frozen[p + "hook_mid"], stash, f"pre{layer}")))
            hooks.append((p + "hook_pre", _stasher(stash, f"pre{layer}")))
        elif kind == "plain":
            hooks.append((p + "hook_pre", _stasher(stash, f"pre{layer}")))
            hooks.append((p + "hook_post", _scale_live(state.frozen[p + "hook_post"], stash, f"pre{layer}")))
    return hooks


def _substitute(value: Tensor) -> Callable[..., Tensor]:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return _expand(value, act, hook.name)

    return hook


def _stasher(stash: dict[str, Tensor], key: str) -> Callable[..., None]:
    def hook(act: Tensor, hook: Any) -> None:
        stash[key] = act

    return hook


def _take(stash: dict[str, Tensor], key: str, hook: Any, missing: str) -> Tensor:
    """Pop what an earlier hook of the same forward stashed; a library error names the hook."""
    value = stash.pop(key, None)
    if value is None:
        raise ReplayError(f"hook '{hook.name}': {missing}")
    return value


def _scale_live(ratio: Tensor, stash: dict[str, Tensor], key: str) -> Callable[..., Tensor]:
    """Return ``ratio * live`` where ``live`` is the value stashed earlier in the same forward."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        live = _take(stash, key, hook, "the matching pre-activation hook did not fire first")
        return _expand(ratio, live, hook.name) * live

    return hook


def _rebuild_z(pattern: Tensor, stash: dict[str, Tensor], key: str) -> Callable[..., Tensor]:
    """``z = pattern @ v`` for attention implementations whose ``hook_pattern`` only observes."""

    def hook(z: Tensor, hook: Any) -> Tensor:
        v = _take(stash, key, hook, "hook_v did not fire before hook_z")
        if v.ndim != 4 or z.ndim != 4:
            raise ReplayError(
                f"hook '{hook.name}': expected [batch, pos, head, d_head], got v {tuple(v.shape)}, z {tuple(z.shape)}"
            )
        n_heads = pattern.shape[1]
        if v.shape[2] != n_heads:
            v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
        pat = pattern.to(v.dtype).expand(v.shape[0], *pattern.shape[1:])
        new = torch.einsum("bhqk,bkhd->bqhd", pat, v)
        if new.shape != z.shape:
            raise ReplayError(f"hook '{hook.name}': rebuilt z {tuple(new.shape)} != live z {tuple(z.shape)}")
        return new

    return hook


def _output_hooks(model: Any, state: FrozenState, spec: ReplaySpec) -> HookList:
    """Hook that reads the requested output and ends the forward there."""
    assert spec.stop is not None
    if spec.output == "resid_post":
        return [stop_at(block_output_hook(model.hook_dict, spec.stop - 1))]
    if spec.output == "ln_final":
        return [stop_at("unembed.hook_in")]
    ratio = state.logit_ratio
    if ratio is None:
        return [stop_at("unembed.hook_out")]
    return [stop_at("unembed.hook_out", lambda act: _expand(ratio, act, "unembed.hook_out") * act)]


def _module_ratio_hooks(state: FrozenState) -> ModuleHookList:
    """Freeze unhooked activations (an encoder's MLM-head GELU) with plain module hooks."""
    hooks: ModuleHookList = []
    for path, ratio in state.head_act_ratio.items():

        def fwd(mod: Any, inp: Any, out: Tensor, ratio: Tensor = ratio, path: str = path) -> Tensor:
            return _expand(ratio, inp[0], path) * inp[0]

        hooks.append((path, fwd))
    return hooks


def _check_input(state: FrozenState, x: Tensor) -> Tensor:
    d_model = state.x0.shape[-1]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != state.n_pos or x.shape[2] != d_model:
        raise ArgumentError(
            "x",
            f"a tensor of shape {tuple(x.shape)}",
            f"[batch, pos={state.n_pos}, d_model={d_model}] or [pos, d_model]",
        )
    return x


def run(model: Any, state: FrozenState, x: Tensor, spec: ReplaySpec, *, frozen: bool = True) -> Tensor:
    """Run ``x`` ``[batch, pos, d_model]`` from ``blocks.{start}.hook_resid_pre`` to the spec's output:
    the affine replay (``frozen=True``) or the real model (``frozen=False``, see :func:`live`).

    The engine (:mod:`tl_tensorlens.engine`) differentiates this function; ``spec`` must be
    :meth:`ReplaySpec.resolved` against ``state``.
    """
    state.check_model(model)
    tokens = state.tokens.to(x.device).expand(x.shape[0], -1)
    hooks = [feed(f"blocks.{spec.start}.hook_resid_pre", x)]
    if frozen:
        hooks = frozen_hooks(model, state, spec) + hooks
    # The live model's logits are its own return value: the soft-cap acts after the last hook.
    live_logits = not frozen and spec.output == "logits"
    if not live_logits:
        hooks += _output_hooks(model, state, spec)
    try:
        with hooks_on(model, hooks, _module_ratio_hooks(state) if frozen else [], frozen=frozen):
            out = model(tokens)
    except StopForward as stop:
        return stop.value
    if live_logits:
        return out
    raise ReplayError(f"the output hook for output={spec.output!r} never fired")


def replay(
    model: Any,
    state: FrozenState,
    x: Float[Tensor, "*batch pos d_model"],
    *,
    output: OutputPoint = "resid_post",
    layers: tuple[int, int] | None = None,
    heads: Mapping[int, Sequence[int]] | None = None,
    bias: bool = True,
) -> Float[Tensor, "*batch pos d_out"]:
    """Run the frozen (affine) model on ``x``.

    Args:
        model: the model the state was captured from.
        state: the capture.
        x: input at ``blocks.{start}.hook_resid_pre``, ``[batch, pos, d_model]`` or ``[pos, d_model]``.
        output: "resid_post", "ln_final" or "logits".
        layers: ``(start, stop)`` block range (default: all blocks).
        heads: per layer, the heads to keep (others zeroed).
        bias: True gives ``F(x) = T x + c``; False gives the linear part ``T x`` alone (computed as a
            forward-mode derivative of the affine map, so no ``F(x) - F(0)`` cancellation).

    Returns:
        The output, same leading shape as ``x``.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> y = replay(model, state, state.x0, output="logits")
        >>> bool(torch.allclose(y, state.logits[0]))
        True
    """
    spec = ReplaySpec(output, *(layers or (0, None)), heads=heads).resolved(state)
    squeeze = x.ndim == 2
    x = _check_input(state, x)
    if bias:
        y = run(model, state, x, spec)
    else:
        primal = torch.zeros_like(x)
        y = torch.func.jvp(lambda inp: run(model, state, inp, spec), (primal,), (x,))[1]
    return y[0] if squeeze else y


def live(
    model: Any,
    state: FrozenState,
    x: Float[Tensor, "batch pos d_model"],
    *,
    output: OutputPoint = "resid_post",
    layers: tuple[int, int] | None = None,
) -> Float[Tensor, "batch pos d_out"]:
    """The real, unfrozen model on inputs ``x`` fed at ``blocks.{start}.hook_resid_pre``.

    The counterpart of :func:`replay` for measuring how far the frozen operator is from the model at
    other inputs (``F(x0 + ε)``); nothing is frozen, so it is nonlinear. ``output="logits"`` is the
    model's own return value (after any output-logit soft-cap).

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> bool(torch.allclose(live(model, state, state.x0[None], output="logits"), state.logits))
        True
    """
    spec = ReplaySpec(output, *(layers or (0, None))).resolved(state)
    return run(model, state, _check_input(state, x), spec, frozen=False)


@contextlib.contextmanager
def linearized(model: Any, state: FrozenState, *, heads: Mapping[int, Sequence[int]] | None = None) -> Iterator[Any]:
    """Context in which ``model`` runs frozen: every TL call inside it (``run_with_hooks``,
    ``run_with_cache``, ``transformer_lens.patching``) sees the linearized model.

    The frozen hooks sit at the outer hook level, so the calls inside add and remove their own
    hooks as usual; all are removed on exit, also when the body raises.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> with linearized(model, state) as m:
        ...     out = m.run_with_hooks(state.tokens, fwd_hooks=[])
        >>> bool(torch.allclose(out, state.logits))
        True
    """
    hooks = frozen_hooks(model, state, ReplaySpec(heads=heads))
    if state.logit_ratio is not None:
        # The soft-cap acts after unembed.hook_out, where no hook can freeze it: every activation
        # inside the context is exactly linear, the returned logits are not.
        warnings.warn(
            "linearized(): output_logits_soft_cap acts after the last hook, so logits returned inside "
            "this context pass through the live (nonlinear) cap; read unembed.hook_out, or use "
            "replay(..., output='logits') / TensorLens, which apply the frozen cap ratio",
            stacklevel=3,
        )
    with hooks_on(model, hooks, _module_ratio_hooks(state), frozen=True):
        yield model


@dataclass(frozen=True)
class ReplayCheck:
    """Result of :func:`verify_replay`.

    Attributes:
        output: the output point checked.
        reproduction_error: ``‖F(x0) − model(x0)‖ / ‖model(x0)‖``.
        affine_error: worst ``‖f(x0+tv) − f(x0) − t(f(x0+v) − f(x0))‖ / ‖t(f(x0+v) − f(x0))‖`` over
            the scales of :func:`affinity_scales` (float64 ``{1e-3, 1, 1e3}``, float32
            ``{0.1, 1, 1e3}``, 16-bit ``{0.25, 1, 4}``); ``inf`` when a probe was not finite.
        tolerance: the threshold of the affinity check (and of the reproduction check unless
            ``reproduction_tolerance`` says otherwise).
        reproduction_tolerance: the threshold of the reproduction check: ``tolerance``, except for
            float64 TransformerBridge models with RMS norms, whose Hugging Face norm computes in
            float32 (1e-5; see docs/method.md §4).
        nonfinite: None, or which values were NaN/inf (the model's own output, the replay at x0, a
            probe ``x0 + t v``): a non-finite value is always a failure, never an error of 0.
    """

    output: str
    reproduction_error: float
    affine_error: float
    tolerance: float
    reproduction_tolerance: float | None = None
    nonfinite: str | None = None

    @property
    def ok(self) -> bool:
        """Both errors finite and within their tolerances."""
        rep_tol = self.tolerance if self.reproduction_tolerance is None else self.reproduction_tolerance
        return (
            self.nonfinite is None
            and math.isfinite(self.reproduction_error)
            and math.isfinite(self.affine_error)
            and self.reproduction_error <= rep_tol
            and self.affine_error <= self.tolerance
        )

    def describe(self) -> str:
        """One line for an error message or a report."""
        rep_tol = self.tolerance if self.reproduction_tolerance is None else self.reproduction_tolerance
        text = (
            f"output={self.output}: reproduction error {self.reproduction_error:.2e} (tolerance {rep_tol:.0e}), "
            f"affine error {self.affine_error:.2e} (tolerance {self.tolerance:.0e})"
        )
        return text + (f"; non-finite: {self.nonfinite}" if self.nonfinite else "")


def affinity_scales(dtype: torch.dtype) -> tuple[float, float, float]:
    """The scales ``t`` at which :func:`verify_replay` checks affinity, by dtype.

    float64: ``(1e-3, 1, 1e3)``. float32: ``(0.1, 1, 1e3)``: ``f(x0 + t v) − f(x0)`` cancels, so its
    rounding relative to ``t T v`` grows as ``1/t``, and at ``t = 1e-3`` it reaches the 1e-4
    tolerance on real weights (all-MiniLM-L6-v2: 1.1e-4 at 1e-3, 1.1e-5 at 1e-2, 1.4e-6 at 0.1).
    A coefficient left unfrozen shows at ``t = 1`` or ``1e3``, not at small ``t``, so nothing is lost.
    16-bit: ``(0.25, 1, 4)``: they cannot represent ``x0 + 1e-3 v`` at all.
    """
    if dtype == torch.float64:
        return (1e-3, 1.0, 1e3)
    if dtype == torch.float32:
        return (0.1, 1.0, 1e3)
    return (0.25, 1.0, 4.0)


def default_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a replay check at ``dtype`` (float64 1e-10, float32 1e-4, else 5e-2)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    return 5e-2


def model_output(model: Any, state: FrozenState, output: OutputPoint, stop: int | None = None) -> Tensor:
    """The model's own output at an output point, read from the capture ``[1, pos, d_out]``."""
    stop = state.n_layers if stop is None else stop
    if output == "resid_post":
        return state.activations[block_output_hook(state.activations, stop - 1)]
    if output == "ln_final":
        return state.activations["unembed.hook_in"]
    if state.logits is None:
        raise ReplayError("the model returned no logits at capture")
    return state.logits


def verify_replay(
    model: Any,
    state_or_tokens: Any,
    *,
    outputs: Sequence[OutputPoint] = ("resid_post",),
    tolerance: float | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> list[ReplayCheck]:
    """Check on the captured prompt that the replay reproduces the model and is affine.

    Args:
        model: the model.
        state_or_tokens: a :class:`FrozenState` or a prompt to capture.
        outputs: output points to check.
        tolerance: relative tolerance (default from the dtype, see :func:`default_tolerance`).
        seed: seed of the random direction ``v``.
        raise_on_failure: raise :class:`VerificationError` when a check fails.

    Returns:
        One :class:`ReplayCheck` per output point.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> checks = verify_replay(TransformerBridge.boot_native(cfg).eval(), torch.tensor([1, 2, 3]), outputs=("logits",))
        >>> checks[0].ok
        True
    """
    state = state_or_tokens if isinstance(state_or_tokens, FrozenState) else capture(model, state_or_tokens)
    x0 = state.x0
    tol = default_tolerance(x0.dtype) if tolerance is None else tolerance
    rep_tol = tol
    if tolerance is None and x0.dtype == torch.float64 and float32_norms_in_float64(model):
        # HF RMSNorm upcasts to float32 inside a float64 model: the model itself is float32-accurate
        # there, while the replay (bridge's own float64 norm path) stays affine to float64 precision.
        rep_tol = 1e-5
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # A direction well above x0's rounding: at t = 1e-3 the check resolves t·T v against eps·|F(x0)|.
    scale = 10.0 * max(1.0, float(x0.double().pow(2).mean().sqrt()))
    v = (scale * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).to(x0)
    ts = affinity_scales(x0.dtype)
    batch = torch.stack([x0, x0 + v] + [x0 + t * v for t in ts])
    labels = ["replay at x0", "probe x0 + v"] + [f"probe x0 + {t:g} v" for t in ts]
    tiny = torch.finfo(x0.dtype).tiny
    checks = []
    for output in outputs:
        with torch.no_grad():
            ys = replay(model, state, batch, output=output)
        ref = model_output(model, state, output)[0]
        bad = ([] if bool(torch.isfinite(ref).all()) else ["the model's own output"]) + [
            label for label, y in zip(labels, ys, strict=True) if not bool(torch.isfinite(y).all())
        ]
        if not bool(torch.isfinite(x0).all()):
            bad.insert(0, "the input x0")
        f0, f1 = ys[0], ys[1]
        rep = float((f0 - ref).norm() / ref.norm().clamp_min(tiny))
        affs = []
        for t, ft in zip(ts, ys[2:], strict=True):
            lin = t * (f1 - f0)
            affs.append(float((ft - f0 - lin).norm() / lin.norm().clamp_min(tiny)))
        # max() would keep an earlier value over a NaN: any non-finite error is reported as inf.
        aff = math.inf if any(not math.isfinite(a) for a in affs) else max(affs)
        rep = rep if math.isfinite(rep) else math.inf
        checks.append(ReplayCheck(output, rep, aff, tol, rep_tol, ", ".join(bad) or None))
    failed = [c for c in checks if not c.ok]
    if failed and raise_on_failure:
        raise VerificationError("; ".join(c.describe() for c in failed))
    return checks


__all__ = [
    "OUTPUT_POINTS",
    "HookList",
    "OutputPoint",
    "ReplayCheck",
    "ReplaySpec",
    "StopForward",
    "affinity_scales",
    "default_tolerance",
    "feed",
    "frozen_hooks",
    "hooks_on",
    "linearized",
    "live",
    "model_output",
    "record",
    "replay",
    "run",
    "stop_at",
    "verify_replay",
]
