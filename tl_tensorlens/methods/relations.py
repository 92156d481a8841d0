"""Linear relation operators: the mean tensor (TensorLens Eq. 26) and the LRE baseline.

**Mean tensor** (TensorLens, arXiv 2601.17958, Sec. 4.2, Eq. 26 with the biases of App. B). For
training prompts ``X_1 … X_n`` of one relation, aligned so that they share a length (see
:mod:`tl_tensorlens.relations._prompts`), each prompt's model is an exact affine map
``F(X) = T_k vec(X) + c_k`` at its own input. Only the last position's output matters, so

    T̄ = (1/n) Σ_k T_k[-1] ∈ R^{d_out × pos × d_model},      c̄ = (1/n) Σ_k c_k[-1],
    ŷ(X') = Σ_j T̄[:, j, :] x'_j + c̄,                        logits = unembed(ŷ).

The output point is the unembedding input (``output="ln_final"``), so the prediction is decoded
exactly as the model decodes its own last hidden state.

**LRE** (Hernandez et al. 2024, "Linearity of Relation Decoding in Transformer Language Models",
ICLR, Sec. 3). With ``s`` the subject's hidden state (last subject token, at the input of block
``layer``; ``layer=0`` is the input embedding, the ablation the TensorLens paper compares against)
and ``o = F(s)`` the same output point as above, each training example gives a first-order
approximation ``W_k = ∂F/∂s |_{s_k}``, ``b_k = F(s_k) − W_k s_k``; the LRE averages them and
scales the weight:

    LRE(s') = β W̄ s' + b̄,      W̄ = (1/n) Σ_k W_k,   b̄ = (1/n) Σ_k b_k.

The Jacobian is taken on the *real* model (not a frozen replay), with a hook feeding ``s``. LRE's
reference code uses β = 2.25 for GPT-J and GPT-2-XL; the value for GPT-NeoX used in the TensorLens
paper was lost with its formulas, so β is a parameter (the study reports a small grid).

**Two routes to the same numbers.** Materializing ``T̄`` costs ``d_out`` vector-Jacobian products per
training prompt (576 through SmolLM2), and so does ``W̄``. A study only ever *applies* the operators
to a few test prompts, and both are means of per-prompt linear maps, so they can be applied without
being built:

    ŷ(X') = (1/n) Σ_k replay_k(X')[-1]                  (the frozen replay of prompt k, fed X')
    LRE(s') = β (1/n) Σ_k J_k s' + (1/n) Σ_k (F_k − J_k s_k)   (J_k s': a forward-mode JVP)

:class:`MeanTensorReplay` and :class:`LinearRelationJVP` do that: ``n`` replays (JVPs) per test
prompt instead of ``d_out`` VJPs per training prompt — cheaper whenever there are fewer test prompts
than ``d_out``. Their ``materialize()`` returns the dense :class:`MeanTensor` /
:class:`LinearRelationEmbedding`, and the tests hold the two routes equal in float64.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._backend import OutputPoint
from tl_tensorlens._checks import as_int
from tl_tensorlens.engine import Pullback
from tl_tensorlens.errors import ArgumentError, TensorLensError
from tl_tensorlens.replay import record

__all__ = [
    "LinearRelationEmbedding",
    "LinearRelationJVP",
    "MeanTensor",
    "MeanTensorReplay",
    "ModelReadout",
    "lre_example",
    "read_model",
    "unembed",
]


def _unembed_module(model: Any) -> torch.nn.Module:
    module = getattr(model, "unembed", None)
    if not isinstance(module, torch.nn.Module):
        raise TensorLensError(f"{type(model).__name__} has no `unembed` module to decode predictions with")
    return module


def unembed(model: Any, y: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
    """Decode hidden states at the unembedding input (``ln_final`` output) into logits.

    A logit soft-cap (Gemma-2), applied by the model after the unembedding, is left out: it is
    monotone, so top-k predictions are unchanged.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8,
        ...                               act_fn="gelu_new", normalization_type="LN")
        >>> unembed(TransformerBridge.boot_native(cfg).eval(), torch.zeros(3, 8)).shape
        torch.Size([3, 11])
    """
    shape = y.shape[:-1]
    flat = y.reshape(-1, 1, y.shape[-1])
    return _unembed_module(model)(flat)[:, 0].reshape(*shape, -1)


@dataclass(frozen=True)
class ModelReadout:
    """What one batched forward over aligned prompts records.

    Attributes:
        x0: ``blocks.0.hook_resid_pre`` — the tensor's input ``X``.
        final: The unembedding input at the last position (the ``"ln_final"`` output point).
        logits: The model's logits at the last position.
        subject: ``blocks.{layer}.hook_resid_pre`` at the subject position, per requested layer.
    """

    x0: Float[Tensor, "batch pos d_model"]
    final: Float[Tensor, "batch d_model"]
    logits: Float[Tensor, "batch d_vocab"]
    subject: dict[int, Float[Tensor, "batch d_model"]]


def _last_unembed_input(model: Any, tokens: Tensor, fwd_hooks: list[tuple[str, Any]]) -> Tensor:
    """Run ``model`` and return the unembedding input at the last position (differentiable), skipping
    the unembedding (stopping there avoids computing ``[batch, pos, d_vocab]`` logits)."""
    _, acts = record(
        model, tokens, ["unembed.hook_in"], fwd_hooks=fwd_hooks, stop_after="unembed.hook_in", detach=False
    )
    return acts["unembed.hook_in"][:, -1]


@torch.no_grad()
def read_model(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    subject_pos: int,
    *,
    layers: Sequence[int] = (0,),
    batch_size: int = 32,
) -> ModelReadout:
    """One batched forward over aligned prompts: input ``x0``, last hidden state, logits, subject states.

    Args:
        model: A TransformerLens model.
        tokens: Aligned prompts.
        subject_pos: Position of the subject's last token (shared by all prompts).
        layers: Record ``blocks.{layer}.hook_resid_pre`` at ``subject_pos`` for these layers.
        batch_size: Prompts per forward.
    """
    device = next(model.parameters()).device
    x0s, finals, subjects = [], [], {layer: [] for layer in layers}
    names = ["blocks.0.hook_resid_pre", *[f"blocks.{layer}.hook_resid_pre" for layer in layers], "unembed.hook_in"]
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start : start + batch_size].to(device)
        _, rec = record(model, chunk, list(dict.fromkeys(names)), stop_after="unembed.hook_in")
        finals.append(rec["unembed.hook_in"][:, -1])
        x0s.append(rec["blocks.0.hook_resid_pre"])
        for layer in layers:
            subjects[layer].append(rec[f"blocks.{layer}.hook_resid_pre"][:, subject_pos])
    final = torch.cat(finals)
    return ModelReadout(
        x0=torch.cat(x0s),
        final=final,
        logits=unembed(model, final),
        subject={layer: torch.cat(v) for layer, v in subjects.items()},
    )


@dataclass(frozen=True)
class MeanTensor:
    """The mean affine operator of a relation's training prompts, last output position only (Eq. 26).

    Attributes:
        weight: ``T̄ = mean_k T_k[-1]``, ``[d_out, pos, d_model]``.
        bias: ``c̄ = mean_k c_k[-1]``.
        n_examples: Number of prompts averaged.
        output: The output point (``"ln_final"``: the unembedding input).

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> torch.manual_seed(0) and None
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8,
        ...                               act_fn="gelu_new", normalization_type="LN", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> mt = MeanTensor.fit(model, tokens)
        >>> x0 = read_model(model, tokens, 0).x0
        >>> bool(torch.allclose(unembed(model, mt.apply(x0)), model(tokens)[:, -1]))
        True
    """

    weight: Float[Tensor, "d_out pos d_model"]
    bias: Float[Tensor, " d_out"]
    n_examples: int
    output: OutputPoint = "ln_final"

    @classmethod
    def fit(
        cls,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        *,
        output: OutputPoint = "ln_final",
        progress: bool = False,
    ) -> "MeanTensor":
        """Average the last-position slices and biases of ``TensorLens.from_model`` over prompts.

        Memory: one ``[d_out, pos, d_model]`` running sum (``d_model·pos·d_out`` floats, e.g. 0.28 GB
        for GPT-2 small at 60 tokens in float64) beside the prompts' captures.

        Args:
            model: A TransformerLens model supported by :class:`tl_tensorlens.TensorLens`.
            tokens: Aligned training prompts, ``[n, pos]``.
            output: Output point passed to ``TensorLens.from_model``.
            progress: Show a tqdm bar over prompts.

        Raises:
            TensorLensError: No prompt given.
        """
        # The captures of MeanTensorReplay, built densely (d_out VJPs per prompt).
        return MeanTensorReplay.fit(model, tokens, output=output).materialize(progress=progress)

    def apply(self, x: Float[Tensor, "*batch pos d_model"], *, bias: bool = True) -> Float[Tensor, "*batch d_out"]:
        """``ŷ = Σ_j T̄[:, j, :] x_j (+ c̄)`` for inputs ``x`` at ``blocks.0.hook_resid_pre``.

        Raises:
            TensorLensError: ``x`` has another number of positions or width than the tensor.
        """
        if tuple(x.shape[-2:]) != tuple(self.weight.shape[1:]):
            raise TensorLensError(
                f"input [.., pos, d_model] = {tuple(x.shape)} does not match the mean tensor's "
                f"[pos, d_model] = {tuple(self.weight.shape[1:])}: prompts are not aligned"
            )
        y = torch.einsum("opd,...pd->...o", self.weight, x.to(self.weight.dtype))
        return y + self.bias if bias else y

    def __repr__(self) -> str:
        d_out, pos, d_model = self.weight.shape
        return (
            f"MeanTensor(d_out={d_out}, pos={pos}, d_model={d_model}, n_examples={self.n_examples}, "
            f"output={self.output!r}, dtype={self.weight.dtype}, device={self.weight.device})"
        )


def _subject_forward(model: Any, tokens: Tensor, subject_pos: int, layer: int) -> Any:
    """``s [batch, d_model] ->`` the last position's unembedding input ``[batch, d_model]`` of the real
    model run on ``tokens`` (one prompt, repeated over the batch) with ``s`` written into
    ``blocks.{layer}.hook_resid_pre`` at ``subject_pos``.

    The write is a ``torch.where`` rather than an in-place index assignment, so that forward-mode
    transforms (``torch.func.jvp``) can carry a tangent through it."""
    hook_name = f"blocks.{layer}.hook_resid_pre"

    def forward(s: Tensor) -> Tensor:
        def put(act: Tensor, hook: Any) -> Tensor:
            at = torch.zeros(act.shape[1], 1, dtype=torch.bool, device=act.device)
            at[subject_pos] = True
            return torch.where(at, s[:, None, :].to(act.dtype), act)

        batch = tokens.to(s.device).expand(s.shape[0], -1)
        return _last_unembed_input(model, batch, [(hook_name, put)])

    return forward


def _subject_positions(tokens: Tensor, subject_pos: int | Sequence[int]) -> list[int]:
    """One subject position per prompt (a shared one repeated), checked against the prompt count."""
    n = tokens.shape[0]
    if tokens.ndim != 2 or n == 0:
        raise ArgumentError("tokens", tuple(tokens.shape), "at least one prompt [n >= 1, pos]")
    positions = [subject_pos] * n if isinstance(subject_pos, int) else list(subject_pos)
    if len(positions) != n:
        raise ArgumentError("subject_pos", positions, f"one position, or {n} positions (one per prompt)")
    return positions


def lre_example(
    model: Any, tokens: Int[Tensor, "1 pos"], subject_pos: int, *, layer: int = 0, chunk: int = 256
) -> tuple[Float[Tensor, "d_out d_model"], Float[Tensor, " d_out"], Float[Tensor, " d_model"]]:
    """First-order approximation of one prompt (LRE's ``order_1_approx``) on the real model.

    Returns:
        ``(W, b, s)`` with ``W = ∂F/∂s`` at the subject state ``s`` and ``b = F(s) − W s``, where
        ``F`` maps ``blocks.{layer}.hook_resid_pre`` at ``subject_pos`` to the unembedding input at
        the last position.
    """
    s0 = read_model(model, tokens, subject_pos, layers=(layer,)).subject[layer][0]
    # The real (unfrozen) model: its graph at s0 gives the LRE Jacobian by vector-Jacobian products.
    pull = Pullback(_subject_forward(model, tokens, subject_pos, layer), s0)
    y = pull.y[0].detach()
    eye = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    weight = torch.cat([pull(eye[i : i + chunk]) for i in range(0, y.shape[0], chunk)]).detach()
    return weight, (y - weight @ s0), s0


@dataclass(frozen=True)
class LinearRelationEmbedding:
    """A Linear Relational Embedding ``LRE(s) = β W̄ s + b̄`` (Hernandez et al. 2024).

    Attributes:
        weight: Mean Jacobian ``W̄``, ``[d_out, d_model]``.
        bias: Mean bias ``b̄``.
        layer: ``s`` is read at ``blocks.{layer}.hook_resid_pre`` (0: input embedding).
        beta: Scale of the weight term.
        n_examples: Number of training prompts averaged.

    Example:
        >>> import torch
        >>> lre = LinearRelationEmbedding(torch.eye(2), torch.ones(2), layer=0, beta=2.0, n_examples=1)
        >>> lre.apply(torch.tensor([1.0, 2.0]))
        tensor([3., 5.])
    """

    weight: Float[Tensor, "d_out d_model"]
    bias: Float[Tensor, " d_out"]
    layer: int = 0
    beta: float = 1.0
    n_examples: int = 1

    @classmethod
    def fit(
        cls,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        subject_pos: int | Sequence[int],
        *,
        layer: int = 0,
        beta: float = 1.0,
        progress: bool = False,
    ) -> "LinearRelationEmbedding":
        """Average per-prompt Jacobians and biases over training prompts.

        Args:
            model: A TransformerLens model.
            tokens: Training prompts ``[n, pos]`` (need not be aligned when ``subject_pos`` is a list).
            subject_pos: Subject's last-token position, shared or per prompt.
            layer: Block whose ``hook_resid_pre`` holds ``s``.
            beta: Weight scale.
            progress: Show a tqdm bar.
        """
        positions = _subject_positions(tokens, subject_pos)
        n = len(positions)
        rows = range(n)
        if progress:
            from tqdm.auto import tqdm

            rows = tqdm(rows, desc="LRE", leave=False)
        weight_sum: Tensor | None = None
        bias_sum: Tensor | None = None
        for k in rows:
            w, b, _ = lre_example(model, tokens[k : k + 1], positions[k], layer=layer)
            weight_sum = w if weight_sum is None else weight_sum + w
            bias_sum = b if bias_sum is None else bias_sum + b
        assert weight_sum is not None and bias_sum is not None
        return cls(weight_sum / n, bias_sum / n, layer, float(beta), n)

    @classmethod
    def from_function(
        cls, fn: Any, states: Float[Tensor, "n d_model"], *, beta: float = 1.0, layer: int = 0
    ) -> "LinearRelationEmbedding":
        """LRE of any differentiable ``fn: [d_model] → [d_out]`` from states ``s_k`` (for tests and toys).

        Example:
            >>> import torch
            >>> A, c = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([0.5, -1.0])
            >>> lre = LinearRelationEmbedding.from_function(lambda s: A @ s + c, torch.randn(3, 2))
            >>> bool(torch.allclose(lre.weight, A) and torch.allclose(lre.bias, c))
            True
        """
        weights, biases = [], []
        for s in states:
            w = torch.autograd.functional.jacobian(fn, s)
            weights.append(w)
            biases.append(fn(s) - w @ s)
        return cls(torch.stack(weights).mean(0), torch.stack(biases).mean(0), layer, float(beta), len(weights))

    def with_beta(self, beta: float) -> "LinearRelationEmbedding":
        """The same LRE with another β (no refit)."""
        return replace(self, beta=float(beta))

    def apply(self, s: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_out"]:
        """``β W̄ s + b̄``."""
        return self.beta * (s.to(self.weight.dtype) @ self.weight.T) + self.bias

    def __repr__(self) -> str:
        d_out, d_model = self.weight.shape
        return (
            f"LinearRelationEmbedding(d_out={d_out}, d_model={d_model}, layer={self.layer}, beta={self.beta}, "
            f"n_examples={self.n_examples}, dtype={self.weight.dtype}, device={self.weight.device})"
        )


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass(frozen=True)
class MeanTensorReplay:
    """The mean tensor of Eq. 26 applied without being built: ``ŷ(X') = (1/n) Σ_k replay_k(X')[-1]``.

    Each training prompt's model is exactly affine at its own input (``replay_k(X) = T_k X + c_k``), so
    the mean of the ``n`` frozen replays, each fed the test input, *is* ``T̄ X' + c̄``. A test prompt
    costs ``n`` replays instead of ``d_out`` VJPs per training prompt for :meth:`MeanTensor.fit`; the
    numbers agree to rounding (``tests/evaluation/test_relations.py``).

    Attributes:
        model: The model the training prompts were captured from.
        states: One verified capture per training prompt.
        output: The output point (``"ln_final"``: the unembedding input).
        batch_size: Test inputs per replay.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> torch.manual_seed(0) and None
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8,
        ...                               act_fn="gelu_new", normalization_type="LN", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> train, test = torch.tensor([[1, 2, 3, 4], [5, 2, 3, 4]]), torch.tensor([[7, 2, 3, 4]])
        >>> lazy = MeanTensorReplay.fit(model, train)
        >>> x = read_model(model, test, 0).x0
        >>> bool(torch.allclose(lazy.apply(x), lazy.materialize().apply(x), atol=1e-12))
        True
    """

    model: Any
    states: tuple[Any, ...]
    output: OutputPoint = "ln_final"
    batch_size: int = 32

    @classmethod
    def fit(
        cls, model: Any, tokens: Int[Tensor, "n pos"], *, output: OutputPoint = "ln_final", batch_size: int = 32
    ) -> "MeanTensorReplay":
        """Capture (and verify) every training prompt; nothing is differentiated yet.

        Raises:
            ArgumentError: ``tokens`` is not ``[n >= 1, pos]``.
            VerificationError: a prompt's frozen replay does not reproduce the model.
        """
        from tl_tensorlens.tensors import TensorLens

        if tokens.ndim != 2 or tokens.shape[0] == 0:
            raise ArgumentError("tokens", tuple(tokens.shape), "aligned prompts [n >= 1, pos]")
        as_int("batch_size", batch_size, lo=1)
        with torch.enable_grad():
            states = tuple(
                TensorLens.from_model(model, tokens[k : k + 1], output=output).state for k in range(len(tokens))
            )
        return cls(model, states, output, batch_size)

    @property
    def n_examples(self) -> int:
        """Number of prompts averaged."""
        return len(self.states)

    @property
    def bias(self) -> Float[Tensor, " d_out"]:
        """``c̄ = (1/n) Σ_k replay_k(0)[-1]`` (one replay per prompt)."""
        from tl_tensorlens.replay import replay

        x0 = self.states[0].x0
        zero = torch.zeros(1, *x0.shape[-2:], dtype=x0.dtype, device=x0.device)
        return torch.stack(
            [replay(self.model, st, zero, output=self.output)[0, -1].detach() for st in self.states]
        ).mean(0)

    def apply(self, x: Float[Tensor, "*batch pos d_model"], *, bias: bool = True) -> Float[Tensor, "*batch d_out"]:
        """``T̄ x (+ c̄)`` for inputs at ``blocks.0.hook_resid_pre``, by ``n`` (batched) replays.

        Raises:
            TensorLensError: ``x`` has another number of positions or width than the training prompts.
        """
        from tl_tensorlens.replay import replay

        pos = self.states[0].n_pos
        if x.ndim < 2 or x.shape[-2] != pos:
            raise TensorLensError(
                f"input [.., pos, d_model] = {tuple(x.shape)} does not match the training prompts' {pos} positions: "
                "prompts are not aligned"
            )
        lead = x.shape[:-2]
        flat = x.reshape(-1, *x.shape[-2:])
        total: Tensor | None = None
        for state in self.states:
            parts = [
                replay(self.model, state, flat[s:e].to(state.x0.dtype), output=self.output, bias=bias)[:, -1].detach()
                for s, e in _batches(flat.shape[0], self.batch_size)
            ]
            y = torch.cat(parts)
            total = y if total is None else total + y
        assert total is not None
        return (total / self.n_examples).reshape(*lead, -1)

    def materialize(self, *, progress: bool = False) -> MeanTensor:
        """The dense :class:`MeanTensor` of the same prompts (``d_out`` VJPs per prompt)."""
        from tl_tensorlens.tensors import TensorLens

        weight: Tensor | None = None
        bias: Tensor | None = None
        states = self.states
        if progress:
            from tqdm.auto import tqdm

            states = tqdm(states, desc="mean tensor", leave=False)
        for state in states:
            with torch.enable_grad():
                lens = TensorLens.from_state(self.model, state, output=self.output)
                last = lens.n_pos - 1
                t_k, c_k = lens.slice(last).detach(), lens.bias[last].detach()
            weight = t_k.clone() if weight is None else weight + t_k
            bias = c_k.clone() if bias is None else bias + c_k
        assert weight is not None and bias is not None
        n = self.n_examples
        return MeanTensor(weight / n, bias / n, n, self.output)

    def __repr__(self) -> str:
        x0 = self.states[0].x0
        return (
            f"MeanTensorReplay(pos={self.states[0].n_pos}, d_model={x0.shape[-1]}, n_examples={self.n_examples}, "
            f"output={self.output!r}, dtype={x0.dtype}, device={x0.device})"
        )


@dataclass(frozen=True)
class LinearRelationJVP:
    """The LRE of :class:`LinearRelationEmbedding` applied without building ``W̄``:
    ``LRE(s') = β (1/n) Σ_k J_k s' + b̄`` with ``J_k s'`` a forward-mode JVP of the real model at
    training prompt ``k`` and ``b̄ = (1/n) Σ_k (F_k − J_k s_k)``.

    A test state costs ``n`` JVPs instead of ``d_out`` VJPs per training prompt for
    :meth:`LinearRelationEmbedding.fit`; the numbers agree to rounding.

    Attributes:
        model: The model.
        tokens: The training prompts.
        subject_pos: Subject's last-token position per prompt.
        bias: ``b̄``.
        layer: ``s`` is read at ``blocks.{layer}.hook_resid_pre``.
        beta: Scale of the weight term.
        batch_size: Test states per JVP batch.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> torch.manual_seed(0) and None
        >>> cfg = TransformerBridgeConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=11, n_ctx=8,
        ...                               act_fn="gelu_new", normalization_type="LN", dtype=torch.float64)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> train = torch.tensor([[1, 2, 3, 4], [5, 2, 3, 4]])
        >>> lazy = LinearRelationJVP.fit(model, train, 0, layer=1, beta=2.0)
        >>> s = torch.randn(3, 8, dtype=torch.float64)
        >>> bool(torch.allclose(lazy.apply(s), lazy.materialize().apply(s), atol=1e-10))
        True
    """

    model: Any
    tokens: Int[Tensor, "n pos"]
    subject_pos: tuple[int, ...]
    bias: Float[Tensor, " d_out"]
    layer: int = 0
    beta: float = 1.0
    batch_size: int = 32

    @classmethod
    def fit(
        cls,
        model: Any,
        tokens: Int[Tensor, "n pos"],
        subject_pos: int | Sequence[int],
        *,
        layer: int = 0,
        beta: float = 1.0,
        batch_size: int = 32,
    ) -> "LinearRelationJVP":
        """Record ``s_k`` and ``F_k`` and compute ``b̄`` (one forward and one JVP per training prompt).

        Raises:
            ArgumentError: no prompt, or ``subject_pos`` is neither one position nor one per prompt.
        """
        positions = _subject_positions(tokens, subject_pos)
        n = len(positions)
        as_int("batch_size", batch_size, lo=1)
        total: Tensor | None = None
        for k in range(n):
            s_k = read_model(model, tokens[k : k + 1], positions[k], layers=(layer,)).subject[layer]
            fn = _subject_forward(model, tokens[k : k + 1], positions[k], layer)
            with torch.inference_mode(False), torch.enable_grad():
                f_k, j_s = torch.func.jvp(fn, (s_k,), (s_k,))[:2]
            b_k = (f_k - j_s).detach()[0]
            total = b_k if total is None else total + b_k
        assert total is not None
        return cls(model, tokens, tuple(positions), total / n, layer, float(beta), batch_size)

    @property
    def n_examples(self) -> int:
        """Number of training prompts averaged."""
        return self.tokens.shape[0]

    def with_beta(self, beta: float) -> "LinearRelationJVP":
        """The same LRE with another β (no refit)."""
        return replace(self, beta=float(beta))

    def weight_apply(self, s: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_out"]:
        """``W̄ s`` (no β, no bias): per training prompt, one forward of the real model carrying a
        batch of tangents (``torch.func.vmap`` over ``torch.func.jvp``)."""
        lead = s.shape[:-1]
        flat = s.reshape(-1, s.shape[-1]).to(self.bias.dtype)
        total: Tensor | None = None
        for k in range(self.n_examples):
            tokens = self.tokens[k : k + 1]
            s_k = read_model(self.model, tokens, self.subject_pos[k], layers=(self.layer,)).subject[self.layer]
            fn = _subject_forward(self.model, tokens, self.subject_pos[k], self.layer)

            def jvp_one(tangent: Tensor, fn: Any = fn, s_k: Tensor = s_k) -> Tensor:
                return torch.func.jvp(fn, (s_k,), (tangent[None],))[1][0]

            parts = []
            for a, b in _batches(flat.shape[0], self.batch_size):
                # vmap over the tangents: the primal (prompt k's own forward) is computed once and
                # shared, not once per test state (2.3x faster on SmolLM2 than a batch of copies).
                with torch.inference_mode(False), torch.enable_grad():
                    parts.append(torch.func.vmap(jvp_one)(flat[a:b]).detach())
            y = torch.cat(parts)
            total = y if total is None else total + y
        assert total is not None
        return (total / self.n_examples).reshape(*lead, -1)

    def apply(
        self, s: Float[Tensor, "*batch d_model"], *, weight: Tensor | None = None
    ) -> Float[Tensor, "*batch d_out"]:
        """``β W̄ s + b̄``; pass ``weight=`` (a :meth:`weight_apply` result) to reuse it across β."""
        ws = self.weight_apply(s) if weight is None else weight
        return self.beta * ws + self.bias

    def materialize(self) -> LinearRelationEmbedding:
        """The dense :class:`LinearRelationEmbedding` of the same prompts (``d_out`` VJPs per prompt)."""
        return LinearRelationEmbedding.fit(
            self.model, self.tokens, list(self.subject_pos), layer=self.layer, beta=self.beta
        )

    def __repr__(self) -> str:
        return (
            f"LinearRelationJVP(d_out={self.bias.shape[0]}, layer={self.layer}, beta={self.beta}, "
            f"n_examples={self.n_examples}, dtype={self.bias.dtype}, device={self.bias.device})"
        )
