"""Perturbation tests (paper Sec. 4.1): mask the tokens a relevance map ranks highest (positive)
or lowest (negative) and watch the model's prediction degrade.

For each example the harness captures **one** forward (the state every method reads), takes the
relevance row of the target position (encoder: ``[CLS]``, position 0; decoder: the last
position), ranks the maskable input tokens by it, masks the top-k (positive) or bottom-k
(negative) for each fraction (default 0 %, 5 %, …, 30 %), and records, against the unperturbed
prediction: whether the prediction is unchanged ("accuracy"), the probability of the original
prediction, and the mean squared change of the output hidden state at the target position.

* **Masking.** ``"replace"`` puts ``mask_token_id`` in place of each masked token ([MASK] for BERT
  encoders; for decoders a pad/unk-like token of your choice). ``"delete"`` removes the tokens
  (decoders: the sequence shortens, the target stays the last position). Special tokens
  (``special_token_ids``: [CLS], [SEP], BOS, ...) are never masked and never counted.
* **k.** ``k = ⌊f · n + 1/2⌋`` with ``n`` the number of maskable tokens
  (:func:`tl_tensorlens.metrics.n_masked`). Ties in relevance break by position (stable sort).
* **Resume.** Rows go to a JSONL file, one line per (example, method, direction, fraction); all
  rows of one example are written with a single ``write`` and ``fsync``'d. A rerun reads the file,
  drops a torn last line, skips every (example, method) already complete, and returns the table
  in a canonical order, so an interrupted run and an uninterrupted one give the same table.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens import metrics
from tl_tensorlens.errors import TensorLensError

Direction = Literal["positive", "negative"]
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


@dataclass(frozen=True)
class Example:
    """One input: a stable id (the resume key) and its token ids, special tokens included."""

    id: str
    tokens: Int[Tensor, " pos"]


@dataclass(frozen=True)
class Prediction:
    """What a readout sees for a batch: output hidden states and output probabilities."""

    hidden: Float[Tensor, "batch d_model"]
    probs: Float[Tensor, "batch n_out"]


@runtime_checkable
class Readout(Protocol):
    """Where the prediction is read and what the class-specific methods should explain."""

    def position(self, n_tokens: int) -> int:
        """The output position explained (a row of the relevance map)."""
        ...

    def __call__(self, model: Any, tokens: Int[Tensor, "batch pos"]) -> Prediction:
        """Hidden state and probabilities at :meth:`position` for a batch of equal-length inputs."""
        ...

    def target(self, predicted: int) -> Any:
        """The ``target=`` passed to methods for a predicted class/token."""
        ...


def _final_hidden(model: Any, tokens: Tensor, hook: str) -> tuple[Tensor, Any]:
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        store["h"] = act.detach()

    out = model.run_with_hooks(tokens, fwd_hooks=[(hook, keep)])
    if "h" not in store:
        raise TensorLensError(f"hook {hook!r} did not fire on {type(model).__name__}")
    return store["h"], out


class ClassifierReadout:
    """A linear classification head on one position's final hidden state (encoders).

    ``logits = h[position] @ W + b``. The class-specific target is the head's column ``W[:, c]``
    of the predicted class c (paper Eq. 24: "the corresponding column in the classification head").

    Args:
        W: ``[d_model, n_classes]``.
        b: ``[n_classes]``.
        position: the pooled position ([CLS] = 0).
        hidden_hook: hook holding the final hidden state; default
            ``blocks.{L-1}.hook_normalized_resid_post`` on HookedEncoder, else ``hook_resid_post``.
    """

    def __init__(
        self,
        W: Float[Tensor, "d_model n_classes"],
        b: Float[Tensor, " n_classes"],
        *,
        position: int = 0,
        hidden_hook: str | None = None,
    ):
        if W.dim() != 2 or b.shape != (W.shape[1],):
            raise TensorLensError(
                f"head W must be [d_model, n_classes] and b [n_classes]; got {tuple(W.shape)}, {tuple(b.shape)}"
            )
        self.W, self.b, self._position, self.hidden_hook = W, b, position, hidden_hook

    def position(self, n_tokens: int) -> int:
        return self._position

    def _hook(self, model: Any) -> str:
        if self.hidden_hook is not None:
            return self.hidden_hook
        last = model.cfg.n_layers - 1
        if any(c.__name__ == "HookedEncoder" for c in type(model).__mro__):
            return f"blocks.{last}.hook_normalized_resid_post"
        return f"blocks.{last}.hook_resid_post"

    def __call__(self, model: Any, tokens: Int[Tensor, "batch pos"]) -> Prediction:
        h, _ = _final_hidden(model, tokens, self._hook(model))
        h = h[:, self._position]
        logits = h @ self.W.to(h.dtype) + self.b.to(h.dtype)
        return Prediction(h, torch.softmax(logits.to(torch.float64), -1))

    def target(self, predicted: int) -> Tensor:
        return self.W[:, predicted]


class NextTokenReadout:
    """Next-token prediction at the last position (decoders).

    The hidden state is what the unembedding reads (``unembed.hook_in``: after ``ln_final``);
    the class-specific target is the predicted token id (``collapse("logit", token=...)``).
    """

    def __init__(self, hidden_hook: str = "unembed.hook_in"):
        self.hidden_hook = hidden_hook

    def position(self, n_tokens: int) -> int:
        return n_tokens - 1

    def __call__(self, model: Any, tokens: Int[Tensor, "batch pos"]) -> Prediction:
        h, logits = _final_hidden(model, tokens, self.hidden_hook)
        return Prediction(h[:, -1], torch.softmax(logits[:, -1].to(torch.float64), -1))

    def target(self, predicted: int) -> int:
        return int(predicted)


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of a perturbation run (all of them enter the resume key).

    Attributes:
        fractions: masked fractions, increasing, starting at 0 for AOPC/HS-MSE as defined.
        directions: ``"positive"`` (most relevant first) and/or ``"negative"`` (least first).
        masking: ``"replace"`` (with ``mask_token_id``) or ``"delete"``.
        mask_token_id: the replacement token ([MASK] for encoders).
        special_token_ids: ids never masked ([CLS], [SEP], BOS, padding).
        batch_size: perturbed sequences per forward.
        rank_by: ``"value"`` ranks by the relevance itself (the paper's protocol); ``"magnitude"`` by
            ``|relevance|``, so for signed maps (In+Out, In+Class) the tokens masked first in negative
            perturbation are those with the *smallest* effect, not the most negative one.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    directions: tuple[str, ...] = ("positive", "negative")
    masking: Literal["replace", "delete"] = "replace"
    mask_token_id: int | None = None
    special_token_ids: tuple[int, ...] = ()
    batch_size: int = 64
    rank_by: Literal["value", "magnitude"] = "value"

    def __post_init__(self) -> None:
        if self.rank_by not in ("value", "magnitude"):
            raise TensorLensError(f"rank_by must be 'value' or 'magnitude', got {self.rank_by!r}")
        fr = list(self.fractions)
        if not fr or any(b <= a for a, b in zip(fr, fr[1:], strict=False)) or fr[0] < 0 or fr[-1] > 1:
            raise TensorLensError(f"fractions must be increasing within [0, 1], got {self.fractions}")
        bad = set(self.directions) - {"positive", "negative"}
        if bad or not self.directions:
            raise TensorLensError(f"directions must be 'positive'/'negative', got {self.directions}")
        if self.masking not in ("replace", "delete"):
            raise TensorLensError(f"masking must be 'replace' or 'delete', got {self.masking!r}")
        if self.masking == "replace" and self.mask_token_id is None:
            raise TensorLensError("masking='replace' needs mask_token_id (e.g. the tokenizer's [MASK])")

    def key(self) -> str:
        """A short hash of the settings that change results (not the batch size)."""
        d = asdict(self)
        d.pop("batch_size")
        if d["rank_by"] == "value":  # the original protocol keeps the keys of runs made before rank_by existed
            d.pop("rank_by")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class _PlainState:
    """Fallback capture (tokens + activations) used when the core capture is unavailable."""

    tokens: Tensor
    activations: dict[str, Tensor] = field(repr=False)


def default_capture(model: Any, tokens: Int[Tensor, "1 pos"]) -> Any:
    """One forward: the core ``FrozenState`` when available, else tokens + the TL cache."""
    try:
        from tl_tensorlens.capture import capture  # type: ignore[attr-defined]
    except ImportError:
        capture = None
    if capture is not None:
        return capture(model, tokens)
    _, cache = model.run_with_cache(tokens)
    return _PlainState(tokens, {k: v for k, v in cache.items()})


def rank_positions(
    relevance: Float[Tensor, " pos_in"],
    maskable: Sequence[int],
    direction: str,
    rank_by: Literal["value", "magnitude"] = "value",
) -> list[int]:
    """Maskable positions in masking order (most relevant first for "positive").

    Example:
        >>> rank_positions(torch.tensor([0.0, 3.0, 1.0, 2.0]), [1, 2, 3], "positive")
        [1, 3, 2]
        >>> rank_positions(torch.tensor([0.0, 3.0, 1.0, 2.0]), [1, 2, 3], "negative")
        [2, 3, 1]
        >>> rank_positions(torch.tensor([0.0, -3.0, 1.0, 2.0]), [1, 2, 3], "negative", "magnitude")
        [2, 3, 1]
    """
    idx = torch.tensor(list(maskable), dtype=torch.long)
    rel = relevance.detach().to(torch.float64).cpu()[idx]
    if rank_by == "magnitude":
        rel = rel.abs()
    if not torch.isfinite(rel).all():
        raise TensorLensError(f"relevance row has non-finite entries at maskable positions: {rel}")
    key = -rel if direction == "positive" else rel
    order = torch.sort(key, stable=True).indices
    return [int(i) for i in idx[order]]


def _perturb(tokens: Tensor, masked: Sequence[int], config: PerturbationConfig) -> Tensor:
    if not masked:
        return tokens
    if config.masking == "replace":
        out = tokens.clone()
        out[list(masked)] = int(config.mask_token_id)  # type: ignore[arg-type]
        return out
    keep = torch.ones(tokens.shape[0], dtype=torch.bool)
    keep[list(masked)] = False
    return tokens[keep]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if good_end < len(data):
        # The last write did not finish: truncate so the next append starts on a fresh line.
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
        data = data[:good_end]
    rows = []
    for line in data.decode().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def load_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a results file, de-duplicated by (config, example, method, direction, fraction)."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in _read_jsonl(Path(path)):
        seen.setdefault(_row_key(row), row)
    return list(seen.values())


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["config"], row["example"], row["method"], row["direction"], round(row["fraction"], 9))


def run_perturbation(
    model: Any,
    examples: Iterable[Example],
    methods: Sequence[str],
    readout: Readout,
    config: PerturbationConfig,
    out_path: str | os.PathLike[str],
    *,
    progress: bool = True,
    capture_fn: Callable[[Any, Tensor], Any] = default_capture,
    on_example_written: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a perturbation test and return its rows.

    Args:
        model: a TransformerLens model (eval mode).
        examples: inputs with unique ids.
        methods: registry names (:func:`tl_tensorlens.baselines.list_methods`).
        readout: :class:`ClassifierReadout` or :class:`NextTokenReadout` (or your own).
        config: fractions, directions, masking.
        out_path: the JSONL file (appended to; created if absent).
        progress: show a tqdm bar.
        capture_fn: ``(model, tokens[1, pos]) -> state`` (one forward per example).
        on_example_written: called with the number of examples written so far in this call,
            after each example's rows are on disk (tests use it to interrupt a run).

    Returns:
        The rows of these examples × methods, in (example, method, direction, fraction) order.

    Example:
        >>> import torch, tempfile, os
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=12, act_fn="gelu", normalization_type="LN", seed=0)
        >>> model = HookedTransformer(cfg)
        >>> ex = [Example("a", torch.tensor([0, 5, 6, 7, 8, 9]))]
        >>> conf = PerturbationConfig(fractions=(0.0, 0.2, 0.4), masking="replace",
        ...     mask_token_id=1, special_token_ids=(0,))
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
        >>> rows = run_perturbation(model, ex, ["attn_rollout"], NextTokenReadout(), conf, path,
        ...     progress=False)
        >>> len(rows), rows[0]["correct"]
        (6, 1)
    """
    from tl_tensorlens.baselines import get_method

    fns = {m: get_method(m) for m in methods}
    examples = list(examples)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise TensorLensError("example ids must be unique (they are the resume key)")
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = config.key()
    existing = _read_jsonl(path)
    other = {r["config"] for r in existing} - {key}
    if other:
        raise TensorLensError(
            f"{path} holds rows of another configuration ({sorted(other)}; this one is {key}): "
            "use a new file per configuration"
        )
    per_unit = len(config.directions) * len(config.fractions)
    counts: dict[tuple[str, str], set[tuple[str, float]]] = {}
    for r in existing:
        counts.setdefault((r["example"], r["method"]), set()).add((r["direction"], round(r["fraction"], 9)))
    done = {u for u, s in counts.items() if len(s) == per_unit}

    from tqdm.auto import tqdm

    written = 0
    with torch.no_grad():
        for ex in tqdm(examples, desc="perturbation", disable=not progress):
            todo = [m for m in methods if (ex.id, m) not in done]
            if not todo:
                continue
            rows = _run_example(model, ex, todo, fns, readout, config, capture_fn, key)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in rows))
                fh.flush()
                os.fsync(fh.fileno())
            written += 1
            if on_example_written is not None:
                on_example_written(written)

    wanted_m, wanted_e = set(methods), set(ids)
    rows = [r for r in load_rows(path) if r["method"] in wanted_m and r["example"] in wanted_e]
    order_e = {e: i for i, e in enumerate(ids)}
    order_m = {m: i for i, m in enumerate(methods)}
    order_d = {d: i for i, d in enumerate(config.directions)}
    rows.sort(key=lambda r: (order_e[r["example"]], order_m[r["method"]], order_d[r["direction"]], r["fraction"]))
    return rows


def _run_example(
    model: Any,
    ex: Example,
    methods: Sequence[str],
    fns: dict[str, Any],
    readout: Readout,
    config: PerturbationConfig,
    capture_fn: Callable[[Any, Tensor], Any],
    key: str,
) -> list[dict[str, Any]]:
    tokens = ex.tokens.reshape(-1).to(torch.long)
    n = tokens.shape[0]
    position = readout.position(n)
    specials = set(config.special_token_ids)
    maskable = [i for i in range(n) if int(tokens[i]) not in specials]
    state = capture_fn(model, tokens[None])

    # (method, direction, fraction, k, perturbed tokens); the original input is forwarded first.
    plans: list[tuple[str, str, float, int, Tensor]] = []
    base = readout(model, tokens[None])
    orig_pred = int(base.probs[0].argmax())
    orig_prob = float(base.probs[0, orig_pred])
    target = readout.target(orig_pred)
    for m in methods:
        rel = fns[m](model, state, position=position, target=target)
        if rel.shape[-1] != n:
            raise TensorLensError(f"method {m!r} returned a map of shape {tuple(rel.shape)} for {n} tokens")
        row = rel[position]
        for d in config.directions:
            order = rank_positions(row, maskable, d, config.rank_by) if maskable else []
            for f in config.fractions:
                k = metrics.n_masked(f, len(maskable))
                plans.append((m, d, f, k, _perturb(tokens, order[:k], config)))

    # Many plans share an input (every 0 % step, rankings that agree): forward each input once.
    unique: dict[tuple[int, ...], int] = {}
    plan_input = [unique.setdefault(tuple(p[4].tolist()), len(unique)) for p in plans]
    inputs = [torch.tensor(t, dtype=torch.long) for t in unique]
    u_hidden: list[Tensor] = [torch.empty(0)] * len(inputs)
    u_probs: list[Tensor] = [torch.empty(0)] * len(inputs)
    # Group by length (deletion shortens sequences); each group runs in batches.
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(inputs):
        by_len.setdefault(t.shape[0], []).append(i)
    for idxs in by_len.values():
        for s in range(0, len(idxs), config.batch_size):
            chunk = idxs[s : s + config.batch_size]
            pred = readout(model, torch.stack([inputs[i] for i in chunk]))
            for j, i in enumerate(chunk):
                u_hidden[i], u_probs[i] = pred.hidden[j], pred.probs[j]
    hidden = [u_hidden[u] for u in plan_input]
    probs = [u_probs[u] for u in plan_input]

    rows = []
    h0 = base.hidden[0]
    for i, (m, d, f, k, _) in enumerate(plans):
        p = probs[i]
        pred_i = int(p.argmax())
        rows.append(
            {
                "config": key,
                "example": ex.id,
                "method": m,
                "direction": d,
                "fraction": float(f),
                "k": k,
                "n_tokens": n,
                "n_maskable": len(maskable),
                "orig_pred": orig_pred,
                "orig_prob": orig_prob,
                "pred": pred_i,
                "prob": float(p[orig_pred]),
                "correct": int(pred_i == orig_pred),
                "hs_mse": float(metrics.hidden_state_mse(h0.to(torch.float64), hidden[i].to(torch.float64))),
            }
        )
    return rows


@dataclass(frozen=True)
class MethodSummary:
    """Aggregates of one method × direction over examples (means with bootstrap CIs)."""

    method: str
    direction: str
    n_examples: int
    fractions: tuple[float, ...]
    accuracy_curve: tuple[float, ...]
    prob_curve: tuple[float, ...]
    auc_accuracy: metrics.Estimate
    auc_prob: metrics.Estimate
    aopc: metrics.Estimate
    hs_mse: metrics.Estimate


def per_example_scores(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per (method, direction): per-example AUC(accuracy), AUC(prob), AOPC, HS-MSE and curves.

    Examples are in first-seen order, so two methods' arrays are paired example by example.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["direction"], r["example"]), []).append(r)
    out: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for (m, d, _), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["fraction"])
        fr = [r["fraction"] for r in rs]
        acc = [float(r["correct"]) for r in rs]
        prob = [r["prob"] for r in rs]
        acc_ = out.setdefault(
            (m, d),
            {"fractions": [fr], "auc_accuracy": [], "auc_prob": [], "aopc": [], "hs_mse": [], "acc": [], "prob": []},
        )
        if fr != acc_["fractions"][0]:
            raise TensorLensError(f"rows of {m}/{d} mix fraction grids: {fr} vs {acc_['fractions'][0]}")
        acc_["auc_accuracy"].append(metrics.auc(fr, acc))
        acc_["auc_prob"].append(metrics.auc(fr, prob))
        acc_["aopc"].append(metrics.aopc(rs[0]["orig_prob"], prob))
        acc_["hs_mse"].append(metrics.hs_mse([r["hs_mse"] for r in rs]))
        acc_["acc"].append(acc)
        acc_["prob"].append(prob)
    return {
        k: {n: np.asarray(v if n != "fractions" else v[0], dtype=np.float64) for n, v in d.items()}
        for k, d in out.items()
    }


def summarize(
    rows: Sequence[dict[str, Any]], *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[MethodSummary]:
    """One :class:`MethodSummary` per (method, direction), in first-seen order."""
    out = []
    for (m, d), s in per_example_scores(rows).items():
        ci = {
            name: metrics.bootstrap_ci(s[name], n_resamples=n_resamples, confidence=confidence, seed=seed)
            for name in ("auc_accuracy", "auc_prob", "aopc", "hs_mse")
        }
        out.append(
            MethodSummary(
                m,
                d,
                len(s["aopc"]),
                tuple(float(f) for f in s["fractions"]),
                tuple(float(v) for v in s["acc"].mean(0)),
                tuple(float(v) for v in s["prob"].mean(0)),
                ci["auc_accuracy"],
                ci["auc_prob"],
                ci["aopc"],
                ci["hs_mse"],
            )
        )
    return out


def format_table(summaries: Sequence[MethodSummary]) -> str:
    """A Markdown table: one line per method, positive and negative side by side.

    Lower is better for positive AUC (the prediction should break fast when the most relevant
    tokens go), higher for negative AUC; AOPC the reverse; HS-MSE like AOPC.
    """
    by: dict[str, dict[str, MethodSummary]] = {}
    for s in summaries:
        by.setdefault(s.method, {})[s.direction] = s
    dirs = [d for d in ("positive", "negative") if any(d in v for v in by.values())]
    head = ["method", "n"]
    for d in dirs:
        tag = "pos" if d == "positive" else "neg"
        head += [f"AUC acc ({tag})", f"AOPC ({tag})", f"HS-MSE ({tag})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, ds in by.items():
        n = next(iter(ds.values())).n_examples
        cells = [m, str(n)]
        for d in dirs:
            s = ds.get(d)
            cells += [str(s.auc_accuracy), str(s.aopc), str(s.hs_mse)] if s else ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(summaries: Sequence[MethodSummary], *, metric: Literal["accuracy", "prob"] = "accuracy") -> Any:
    """Mean perturbation curves, one panel per direction; returns a matplotlib Figure (not shown)."""
    import matplotlib
    from matplotlib.figure import Figure

    dirs = [d for d in ("positive", "negative") if any(s.direction == d for s in summaries)]
    fig = Figure(figsize=(5.5 * len(dirs) + 1.8, 4.2), layout="constrained")
    axes = fig.subplots(1, len(dirs), squeeze=False)[0]
    # One fixed, distinct colour per method (the default 10-colour cycle repeats past 10 methods).
    methods = list(dict.fromkeys(s.method for s in summaries))
    palette = matplotlib.colormaps["tab20"]
    colour = {m: palette(i % 20) for i, m in enumerate(methods)}
    for ax, d in zip(axes, dirs, strict=True):
        for s in summaries:
            if s.direction != d:
                continue
            y = s.accuracy_curve if metric == "accuracy" else s.prob_curve
            style = "-" if s.method.startswith("tensor") else (":" if s.method == "random" else "--")
            ax.plot([100 * f for f in s.fractions], y, style, color=colour[s.method], marker="o", ms=3, label=s.method)
        ax.set_title(f"{d} perturbation")
        ax.set_xlabel("% of tokens masked")
        ax.set_ylabel("prediction unchanged" if metric == "accuracy" else "p(original prediction)")
        ax.grid(alpha=0.3)
    # Outside the panels: with a dozen methods a legend inside always hides some curve.
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig
