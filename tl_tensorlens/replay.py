"""The frozen replay: the model with its captured coefficients substituted, exactly affine in its input.

This is the only module that installs hooks. Every hook lives inside a context
(``model.hooks(...)`` plus ``try/finally`` for the few plain PyTorch module hooks), so no hook
survives a replay, even one that raises midway.

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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tl_tensorlens.capture import FrozenState, block_output_hook, capture
from tl_tensorlens.errors import ReplayError, UnsupportedModelError, VerificationError

OutputPoint = Literal["resid_post", "ln_final", "logits"]
OUTPUT_POINTS: tuple[str, ...] = ("resid_post", "ln_final", "logits")
HookList = list[tuple[str, Callable[..., Any]]]


class _StopReplay(Exception):
    """Raised from the output hook to end the forward early, carrying the output."""

    def __init__(self, value: Tensor):
        super().__init__("replay output read")
        self.value = value


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
        """Check the spec against a capture and fill ``stop``."""
        n = state.n_layers
        stop = n if self.stop is None else self.stop
        if self.output not in OUTPUT_POINTS:
            raise ReplayError(f"output={self.output!r}; choose one of {OUTPUT_POINTS}")
        if not (0 <= self.start < stop <= n):
            raise ReplayError(f"layers=({self.start}, {stop}) must satisfy 0 <= start < stop <= n_layers={n}")
        if self.output in state.unsupported_outputs:
            raise UnsupportedModelError({f"output={self.output!r}": state.unsupported_outputs[self.output]})
        if self.output != "resid_post" and stop != n:
            raise ReplayError(
                f"output={self.output!r} reads after ln_final, so the range must end at the last block "
                f"(stop={n}), got stop={stop}; use output='resid_post' for a partial range"
            )
        heads = None
        if self.heads is not None:
            heads = {}
            n_heads = int(state.pattern(0).shape[0])
            for layer, hs in self.heads.items():
                if not 0 <= int(layer) < n:
                    raise ReplayError(f"heads: layer {layer} out of range 0..{n - 1}")
                hs = tuple(int(h) for h in hs)
                for h in hs:
                    if not 0 <= h < n_heads:
                        raise ReplayError(f"heads: head {h} of layer {layer} out of range 0..{n_heads - 1}")
                heads[int(layer)] = hs
        return ReplaySpec(self.output, self.start, stop, heads)


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
        name = block_output_hook(model.hook_dict, spec.stop - 1)

        def read(act: Tensor, hook: Any) -> None:
            raise _StopReplay(act)

        return [(name, read)]
    if spec.output == "ln_final":

        def read_in(act: Tensor, hook: Any) -> None:
            raise _StopReplay(act)

        return [("unembed.hook_in", read_in)]

    ratio = state.logit_ratio

    def read_logits(act: Tensor, hook: Any) -> None:
        raise _StopReplay(act if ratio is None else _expand(ratio, act, hook.name) * act)

    return [("unembed.hook_out", read_logits)]


@contextlib.contextmanager
def _module_ratio_hooks(model: Any, state: FrozenState) -> Iterator[None]:
    """Freeze unhooked activations (an encoder's MLM-head GELU) with plain module hooks."""
    handles = []
    try:
        for path, ratio in state.head_act_ratio.items():
            mod = model.get_submodule(path)

            def fwd(mod: Any, inp: Any, out: Tensor, ratio: Tensor = ratio, path: str = path) -> Tensor:
                return _expand(ratio, inp[0], path) * inp[0]

            handles.append(mod.register_forward_hook(fwd))
        yield
    finally:
        for h in handles:
            h.remove()


def _input_hook(x: Tensor, start: int) -> tuple[str, Callable[..., Tensor]]:
    name = f"blocks.{start}.hook_resid_pre"

    def feed(act: Tensor, hook: Any) -> Tensor:
        if act.shape != x.shape:
            raise ReplayError(
                f"hook '{name}': replay input has shape {tuple(x.shape)}, model expects {tuple(act.shape)}"
            )
        return x

    return (name, feed)


def _check_input(state: FrozenState, x: Tensor) -> Tensor:
    d_model = state.x0.shape[-1]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != state.n_pos or x.shape[2] != d_model:
        raise ReplayError(
            f"replay input must be [batch, pos={state.n_pos}, d_model={d_model}] (or [pos, d_model]), got {tuple(x.shape)}"
        )
    return x


@contextlib.contextmanager
def _bridge_edit_warnings_silenced() -> Iterator[None]:
    """Silence the Bridge's warnings about the edits the replay makes on purpose.

    Editing ``hook_scale`` moves a bridge norm onto its own float64-exact path (that is the point),
    and BERT-on-Bridge ``hook_pattern`` edits are dropped — the replay rebuilds ``hook_z`` there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale")
        warnings.filterwarnings("ignore", message=r"A hook on .*hook_pattern returned a modified tensor")
        yield


def _run(model: Any, state: FrozenState, x: Tensor, spec: ReplaySpec, *, frozen: bool = True) -> Tensor:
    """Run ``x`` [batch, pos, d_model] from ``blocks.{start}.hook_resid_pre`` to the output point:
    the affine replay (``frozen=True``) or the real model (``frozen=False``, see :func:`live`)."""
    tokens = state.tokens.to(x.device).expand(x.shape[0], -1)
    hooks = [_input_hook(x, spec.start)]
    if frozen:
        hooks = frozen_hooks(model, state, spec) + hooks
    # The live model's logits are its own return value: the soft-cap acts after the last hook.
    live_logits = not frozen and spec.output == "logits"
    if not live_logits:
        hooks += _output_hooks(model, state, spec)
    module_hooks = _module_ratio_hooks(model, state) if frozen else contextlib.nullcontext()
    try:
        with _bridge_edit_warnings_silenced(), module_hooks, model.hooks(fwd_hooks=hooks):
            out = model(tokens)
    except _StopReplay as stop:
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
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> y = replay(model, state, state.x0, output="logits")
        >>> bool(torch.allclose(y, state.logits[0]))
        True
    """
    spec = ReplaySpec(output, *(layers or (0, None)), heads=heads).resolved(state)
    squeeze = x.ndim == 2
    x = _check_input(state, x)
    if bias:
        y = _run(model, state, x, spec)
    else:
        primal = torch.zeros_like(x)
        y = torch.func.jvp(lambda inp: _run(model, state, inp, spec), (primal,), (x,))[1]
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
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
        >>> state = capture(model, torch.tensor([1, 2, 3]))
        >>> bool(torch.allclose(live(model, state, state.x0[None], output="logits"), state.logits))
        True
    """
    spec = ReplaySpec(output, *(layers or (0, None))).resolved(state)
    return _run(model, state, _check_input(state, x), spec, frozen=False)


@contextlib.contextmanager
def linearized(model: Any, state: FrozenState, *, heads: Mapping[int, Sequence[int]] | None = None) -> Iterator[Any]:
    """Context in which ``model`` runs frozen: every TL call inside it (``run_with_hooks``,
    ``run_with_cache``, ``transformer_lens.patching``) sees the linearized model.

    The frozen hooks sit at the outer hook level, so the calls inside add and remove their own
    hooks as usual; all are removed on exit, also when the body raises.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> model = HookedTransformer(cfg)
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
    with _module_ratio_hooks(model, state), model.hooks(fwd_hooks=hooks):
        yield model


@dataclass(frozen=True)
class ReplayCheck:
    """Result of :func:`verify_replay`.

    Attributes:
        output: the output point checked.
        reproduction_error: ``‖F(x0) − model(x0)‖ / ‖model(x0)‖``.
        affine_error: worst ``‖f(x0+tv) − f(x0) − t(f(x0+v) − f(x0))‖ / ‖t(f(x0+v) − f(x0))‖`` over
            the scales of :func:`affinity_scales` (float64 ``{1e-3, 1, 1e3}``, float32
            ``{0.1, 1, 1e3}``, 16-bit ``{0.25, 1, 4}``).
        tolerance: the threshold of the affinity check (and of the reproduction check unless
            ``reproduction_tolerance`` says otherwise).
        reproduction_tolerance: the threshold of the reproduction check: ``tolerance``, except for
            float64 TransformerBridge models with RMS norms, whose Hugging Face norm computes in
            float32 (1e-5; see docs/method.md §4).
    """

    output: str
    reproduction_error: float
    affine_error: float
    tolerance: float
    reproduction_tolerance: float | None = None

    @property
    def ok(self) -> bool:
        """Both errors within their tolerances."""
        rep_tol = self.tolerance if self.reproduction_tolerance is None else self.reproduction_tolerance
        return self.reproduction_error <= rep_tol and self.affine_error <= self.tolerance


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
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", dtype=torch.float64)
        >>> checks = verify_replay(HookedTransformer(cfg), torch.tensor([1, 2, 3]), outputs=("logits",))
        >>> checks[0].ok
        True
    """
    state = state_or_tokens if isinstance(state_or_tokens, FrozenState) else capture(model, state_or_tokens)
    x0 = state.x0
    tol = default_tolerance(x0.dtype) if tolerance is None else tolerance
    rep_tol = tol
    if tolerance is None and state.backend == "bridge" and x0.dtype == torch.float64:
        # HF RMSNorm upcasts to float32 inside a float64 model: the model itself is float32-accurate
        # there, while the replay (bridge's own float64 norm path) stays affine to float64 precision.
        if getattr(model.cfg, "normalization_type", None) in ("RMS", "RMSPre"):
            rep_tol = 1e-5
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # A direction well above x0's rounding: at t = 1e-3 the check resolves t·T v against eps·|F(x0)|.
    scale = 10.0 * max(1.0, float(x0.double().pow(2).mean().sqrt()))
    v = (scale * torch.randn(x0.shape, generator=gen, dtype=torch.float64)).to(x0)
    ts = affinity_scales(x0.dtype)
    batch = torch.stack([x0, x0 + v] + [x0 + t * v for t in ts])
    checks = []
    for output in outputs:
        with torch.no_grad():
            ys = replay(model, state, batch, output=output)
        ref = model_output(model, state, output)[0]
        f0, f1 = ys[0], ys[1]
        rep = float((f0 - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))
        aff = 0.0
        for t, ft in zip(ts, ys[2:], strict=True):
            lin = t * (f1 - f0)
            aff = max(aff, float((ft - f0 - lin).norm() / lin.norm().clamp_min(torch.finfo(ref.dtype).tiny)))
        checks.append(ReplayCheck(output, rep, aff, tol, rep_tol))
    failed = [c for c in checks if not c.ok]
    if failed and raise_on_failure:
        raise VerificationError(
            "; ".join(
                f"output={c.output}: reproduction error {c.reproduction_error:.2e}, affine error "
                f"{c.affine_error:.2e} (tolerances {c.reproduction_tolerance or c.tolerance:.0e}, {c.tolerance:.0e})"
                for c in failed
            )
        )
    return checks
