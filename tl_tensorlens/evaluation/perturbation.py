"""Perturbation tests (paper Sec. 4.1): mask the tokens a relevance map ranks highest (positive)
or lowest (negative) and watch the model's prediction degrade.

For each example the harness captures **one** forward (the state every method reads), verifies the
frozen replay on it (a tensor map of a replay that does not reproduce the model would be a wrong
answer, so a failure stops the run), takes the relevance row of the target position (encoder:
``[CLS]``, position 0; decoder: the last position), ranks the maskable input tokens by it, masks the
top-k (``order="positive"``) or bottom-k (``"negative"``) for each fraction (default 0 %, 5 %, …,
30 %), and records, against the unperturbed prediction: whether the prediction is unchanged
("accuracy"), the probability of the original prediction, and the mean squared change of the output
hidden state at the target position.

* **Masking.** ``"replace"`` puts ``mask_token_id`` in place of each masked token ([MASK] for BERT
  encoders; for decoders a pad/unk-like token of your choice). ``"delete"`` removes the tokens
  (decoders: the sequence shortens, the target stays the last position). Special tokens
  (``special_token_ids``: [CLS], [SEP], BOS, ...) are never masked and never counted.
* **k.** ``k = ⌊f · n + 1/2⌋`` with ``n`` the number of maskable tokens
  (:func:`tl_tensorlens.evaluation.metrics.n_masked`). Ties in relevance break by position (stable sort).
* **Resume.** Rows go to a :class:`~tl_tensorlens.evaluation.store.ResultStore` (JSONL), one line per
  (example, method, order, fraction), keyed by the settings, the **model's fingerprint**
  (:func:`~tl_tensorlens.capture.model_fingerprint`: config and every weight) and the **example's
  content** (a hash of its token ids) as well as its id; all rows of one example are written with a
  single ``write`` and ``fsync``. A rerun skips every (model, example, method) already complete, so an
  interrupted run and an uninterrupted one give the same table; the same file can hold several models.
"""

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import InitVar, asdict, dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._backend import default_output, final_hidden_hook
from tl_tensorlens._deprecation import moved_names, renamed_kwargs, warn_deprecated
from tl_tensorlens.capture import capture, model_fingerprint
from tl_tensorlens.errors import ArgumentError, TensorLensError
from tl_tensorlens.evaluation import metrics
from tl_tensorlens.evaluation.store import ResultStore
from tl_tensorlens.replay import record, verify_replay

Order = Literal["positive", "negative"]
ORDERS: tuple[str, ...] = ("positive", "negative")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
#: The fields that identify a row of a perturbation results file.
KEY_FIELDS: tuple[str, ...] = ("config", "model", "example", "tokens", "method", "order", "fraction")


@dataclass(frozen=True)
class Example:
    """One input: a stable id and its token ids, special tokens included."""

    id: str
    tokens: Int[Tensor, " pos"]

    @property
    def digest(self) -> str:
        """A hash of the token ids (part of the resume key, so a changed example is recomputed)."""
        ids = self.tokens.reshape(-1).to(torch.int64).cpu().numpy().tobytes()
        return hashlib.sha1(ids).hexdigest()[:12]


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


class ClassifierReadout:
    """A linear classification head on one position's final hidden state (encoders).

    ``logits = h[position] @ W + b``. The class-specific target is the head's column ``W[:, c]``
    of the predicted class c (paper Eq. 24: "the corresponding column in the classification head").

    Args:
        W: ``[d_model, n_classes]``.
        b: ``[n_classes]``.
        position: the pooled position ([CLS] = 0).
        hidden_hook: hook holding the final hidden state; default the last block's output
            (:func:`tl_tensorlens._backend.final_hidden_hook`).
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
            raise ArgumentError("W, b", (tuple(W.shape), tuple(b.shape)), "W [d_model, n_classes] and b [n_classes]")
        self.W, self.b, self._position, self.hidden_hook = W, b, position, hidden_hook

    def position(self, n_tokens: int) -> int:
        return self._position

    def __call__(self, model: Any, tokens: Int[Tensor, "batch pos"]) -> Prediction:
        hook = self.hidden_hook or final_hidden_hook(model)
        _, acts = record(model, tokens, [hook], stop_after=hook)
        h = acts[hook][:, self._position]
        logits = h @ self.W.to(h.dtype) + self.b.to(h.dtype)
        return Prediction(h, torch.softmax(logits.to(torch.float64), -1))

    def target(self, predicted: int) -> Tensor:
        return self.W[:, predicted]


class NextTokenReadout:
    """Next-token prediction at the last position (decoders).

    The hidden state is what the unembedding reads (``unembed.hook_in``: after ``ln_final``);
    the class-specific target is the predicted token id (``collapse("in_class", token=...)``).
    """

    def __init__(self, hidden_hook: str = "unembed.hook_in"):
        self.hidden_hook = hidden_hook

    def position(self, n_tokens: int) -> int:
        return n_tokens - 1

    def __call__(self, model: Any, tokens: Int[Tensor, "batch pos"]) -> Prediction:
        logits, acts = record(model, tokens, [self.hidden_hook])
        h = acts[self.hidden_hook]
        return Prediction(h[:, -1], torch.softmax(logits[:, -1].to(torch.float64), -1))

    def target(self, predicted: int) -> int:
        return int(predicted)


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of a perturbation run (all of them but the batch size and ``verify`` enter the key).

    Attributes:
        fractions: masked fractions, increasing, starting at 0 for AOPC/HS-MSE as defined.
        orders: ``"positive"`` (most relevant first) and/or ``"negative"`` (least first);
            ``directions=`` is the deprecated name.
        masking: ``"replace"`` (with ``mask_token_id``) or ``"delete"``.
        mask_token_id: the replacement token ([MASK] for encoders).
        special_token_ids: ids never masked ([CLS], [SEP], BOS, padding).
        batch_size: perturbed sequences per forward.
        rank_by: ``"value"`` ranks by the relevance itself (the paper's protocol); ``"magnitude"`` by
            ``|relevance|``, so for signed maps (In+Out, In+Class) the tokens masked first in negative
            perturbation are those with the *smallest* effect, not the most negative one.
        verify: check the frozen replay on every example before the methods read it.
        keep_last: never mask the last position (a decoder's query token, whose removal changes the
            next-token prediction almost always: on SmolLM2 in 40 of 40 WikiText windows, so a method
            that merely ranks it first wins positive perturbation). Fractions then count the other
            positions.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    orders: tuple[str, ...] = ORDERS
    masking: Literal["replace", "delete"] = "replace"
    mask_token_id: int | None = None
    special_token_ids: tuple[int, ...] = ()
    batch_size: int = 64
    rank_by: Literal["value", "magnitude"] = "value"
    verify: bool = True
    keep_last: bool = False
    directions: InitVar[tuple[str, ...] | None] = None

    def __post_init__(self, directions: tuple[str, ...] | None) -> None:
        if directions is not None:
            warn_deprecated("PerturbationConfig(directions=...)", "orders=...", stacklevel=4)
            object.__setattr__(self, "orders", tuple(directions))
        if self.rank_by not in ("value", "magnitude"):
            raise ArgumentError("rank_by", self.rank_by, "'value' or 'magnitude'")
        fr = list(self.fractions)
        if (
            not fr
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fr)
            or any(b <= a for a, b in zip(fr, fr[1:], strict=False))
            or fr[0] < 0
            or fr[-1] > 1
        ):
            raise ArgumentError("fractions", self.fractions, "increasing numbers within [0, 1]")
        bad = set(self.orders) - set(ORDERS)
        if bad or not self.orders:
            raise ArgumentError("orders", self.orders, "a non-empty subset of ('positive', 'negative')")
        if self.masking not in ("replace", "delete"):
            raise ArgumentError("masking", self.masking, "'replace' or 'delete'")
        if self.masking == "replace" and self.mask_token_id is None:
            raise ArgumentError("mask_token_id", None, "a token id for masking='replace' (e.g. the tokenizer's [MASK])")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ArgumentError("batch_size", self.batch_size, "an integer >= 1")
        if not isinstance(self.keep_last, bool):
            raise ArgumentError("keep_last", self.keep_last, "True or False")

    def key(self) -> str:
        """A short hash of the settings that change results (not the batch size or ``verify``)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("verify")
        # Keys written before the rename stay valid: the field was called "directions".
        d["directions"] = d.pop("orders")
        if d["rank_by"] == "value":  # the original protocol keeps the keys of runs made before rank_by existed
            d.pop("rank_by")
        if not d["keep_last"]:  # likewise for runs made before keep_last existed
            d.pop("keep_last")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def default_capture(model: Any, tokens: Int[Tensor, "1 pos"]) -> Any:
    """One forward: the ``FrozenState`` every method reads."""
    return capture(model, tokens)


def rank_positions(
    relevance: Float[Tensor, " pos_in"],
    maskable: Sequence[int],
    order: str,
    rank_by: Literal["value", "magnitude"] = "value",
) -> list[int]:
    """Maskable positions in masking order (most relevant first for ``"positive"``).

    Example:
        >>> rank_positions(torch.tensor([0.0, 3.0, 1.0, 2.0]), [1, 2, 3], "positive")
        [1, 3, 2]
        >>> rank_positions(torch.tensor([0.0, 3.0, 1.0, 2.0]), [1, 2, 3], "negative")
        [2, 3, 1]
        >>> rank_positions(torch.tensor([0.0, -3.0, 1.0, 2.0]), [1, 2, 3], "negative", "magnitude")
        [2, 3, 1]
    """
    if order not in ORDERS:
        raise ArgumentError("order", order, "'positive' or 'negative'")
    idx = torch.tensor(list(maskable), dtype=torch.long)
    rel = relevance.detach().to(torch.float64).cpu()[idx]
    if rank_by == "magnitude":
        rel = rel.abs()
    if not torch.isfinite(rel).all():
        raise TensorLensError(f"relevance row has non-finite entries at maskable positions: {rel}")
    key = -rel if order == "positive" else rel
    ranked = torch.sort(key, stable=True).indices
    return [int(i) for i in idx[ranked]]


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


def _upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rows written by 0.1 called the order "direction" and had no model or token hash."""
    if "direction" in row and "order" not in row:
        row = {**row, "order": row.pop("direction")}
    row.setdefault("model", "unknown")
    row.setdefault("tokens", "unknown")
    return row


def open_store(path: str | os.PathLike[str]) -> ResultStore:
    """The results store of a perturbation run (rows of 0.1 are read with their old field names)."""
    return ResultStore(path, KEY_FIELDS, compare_ignore=("seconds",), upgrade=_upgrade_row)


def load_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of a results file, each key once (conflicting duplicates are an error)."""
    return open_store(path).rows


@renamed_kwargs(out_path="out")
def run_perturbation(
    model: Any,
    examples: Iterable[Example],
    methods: Sequence[str],
    readout: Readout,
    config: PerturbationConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    capture_fn: Callable[[Any, Tensor], Any] = default_capture,
    on_example_written: Callable[[int], None] | None = None,
    model_id: str | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a perturbation test and return its rows.

    Args:
        model: a TransformerLens model (eval mode).
        examples: inputs with unique ids.
        methods: registry names (:func:`tl_tensorlens.methods.list_methods`).
        readout: :class:`ClassifierReadout` or :class:`NextTokenReadout` (or your own).
        config: fractions, orders, masking.
        out: the JSONL results file (appended to; created if absent; ``out_path=`` is its deprecated
            name).
        progress: show a tqdm bar.
        capture_fn: ``(model, tokens[1, pos]) -> state`` (one forward per example).
        on_example_written: called with the number of examples written so far in this call,
            after each example's rows are on disk (tests use it to interrupt a run).
        model_id: the model's key in the file (default: :func:`~tl_tensorlens.capture.model_fingerprint`,
            a hash of the config and every weight).

    Returns:
        The rows of these examples × methods, in (example, method, order, fraction) order.

    Example:
        >>> import torch, tempfile, os
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
        ...     d_vocab=20, n_ctx=12, act_fn="gelu", seed=0)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> ex = [Example("a", torch.tensor([0, 5, 6, 7, 8, 9]))]
        >>> conf = PerturbationConfig(fractions=(0.0, 0.2, 0.4), masking="replace",
        ...     mask_token_id=1, special_token_ids=(0,))
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.jsonl")
        >>> rows = run_perturbation(model, ex, ["attn_rollout"], NextTokenReadout(), conf, path,
        ...     progress=False)
        >>> len(rows), rows[0]["correct"]
        (6, 1)
    """
    from tl_tensorlens.methods import get_method

    fns = {m: get_method(m) for m in methods}
    examples = list(examples)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ArgumentError("examples", dup, "unique example ids (they are part of the resume key)")
    store = open_store(out)
    key = config.key()
    mid = model_id if model_id is not None else model_fingerprint(model)
    digests = {e.id: e.digest for e in examples}
    per_unit = len(config.orders) * len(config.fractions)
    counts: dict[tuple[str, str, str], int] = {}
    for r in store.rows:
        if r["config"] == key and r["model"] == mid:
            u = (r["example"], r["tokens"], r["method"])
            counts[u] = counts.get(u, 0) + 1
    done = {u for u, c in counts.items() if c >= per_unit}

    from tqdm.auto import tqdm

    written = 0
    with torch.no_grad():
        for ex in tqdm(examples, desc="perturbation", disable=not progress):
            todo = [m for m in methods if (ex.id, digests[ex.id], m) not in done]
            if not todo:
                continue
            rows = _run_example(model, ex, todo, fns, readout, config, capture_fn, key, mid)
            store.append(rows)
            written += 1
            if on_example_written is not None:
                on_example_written(written)

    wanted_m = set(methods)
    rows = [
        r
        for r in store.rows
        if r["config"] == key
        and r["model"] == mid
        and r["method"] in wanted_m
        and r["example"] in digests
        and r["tokens"] == digests[r["example"]]
    ]
    order_e = {e: i for i, e in enumerate(ids)}
    order_m = {m: i for i, m in enumerate(methods)}
    order_d = {d: i for i, d in enumerate(config.orders)}
    rows.sort(key=lambda r: (order_e[r["example"]], order_m[r["method"]], order_d[r["order"]], r["fraction"]))
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
    model_id: str,
) -> list[dict[str, Any]]:
    tokens = ex.tokens.reshape(-1).to(torch.long)
    n = tokens.shape[0]
    position = readout.position(n)
    specials = set(config.special_token_ids)
    maskable = [i for i in range(n) if int(tokens[i]) not in specials and not (config.keep_last and i == n - 1)]
    state = capture_fn(model, tokens[None])
    check: Any = None
    if config.verify and hasattr(state, "frozen"):
        # The tensor methods read this capture: a replay that does not reproduce the model stops here.
        (check,) = verify_replay(model, state, outputs=(default_output(model),))

    # (method, order, fraction, k, perturbed tokens); the original input is forwarded first.
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
        for d in config.orders:
            ranked = rank_positions(row, maskable, d, config.rank_by) if maskable else []
            for f in config.fractions:
                k = metrics.n_masked(f, len(maskable))
                plans.append((m, d, f, k, _perturb(tokens, ranked[:k], config)))

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
    digest = ex.digest
    for i, (m, d, f, k, _) in enumerate(plans):
        p = probs[i]
        pred_i = int(p.argmax())
        row = {
            "config": key,
            "model": model_id,
            "example": ex.id,
            "tokens": digest,
            "method": m,
            "order": d,
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
        if check is not None:
            row["replay_affine_error"] = check.affine_error
        rows.append(row)
    return rows


@dataclass(frozen=True)
class MethodSummary:
    """Aggregates of one method × order over examples (means with bootstrap CIs)."""

    method: str
    order: str
    n_examples: int
    fractions: tuple[float, ...]
    accuracy_curve: tuple[float, ...]
    prob_curve: tuple[float, ...]
    auc_accuracy: metrics.Estimate
    auc_prob: metrics.Estimate
    aopc: metrics.Estimate
    hs_mse: metrics.Estimate

    @property
    def direction(self) -> str:
        """Deprecated name of :attr:`order`."""
        warn_deprecated("MethodSummary.direction", "MethodSummary.order")
        return self.order


def per_example_scores(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per (method, order): per-example AUC(accuracy), AUC(prob), AOPC, HS-MSE and curves.

    Examples are in first-seen order, so two methods' arrays are paired example by example.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["order"], r["model"], r["example"], r["tokens"]), []).append(r)
    out: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for (m, d, *_), rs in groups.items():
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
    """One :class:`MethodSummary` per (method, order), in first-seen order."""
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
        by.setdefault(s.method, {})[s.order] = s
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


def _auc_by_example(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[Any, ...], float]]:
    """Per (method, order): the accuracy AUC of every example, keyed by (model, example, tokens)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["order"], r["model"], r["example"], r["tokens"]), []).append(r)
    out: dict[tuple[str, str], dict[tuple[Any, ...], float]] = {}
    for (m, d, *example), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["fraction"])
        out.setdefault((m, d), {})[tuple(example)] = metrics.auc(
            [r["fraction"] for r in rs], [r["correct"] for r in rs]
        )
    return out


def paired_differences(
    rows: Sequence[dict[str, Any]],
    references: Sequence[str],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> str:
    """A Markdown table of paired differences in accuracy AUC: each reference method minus every other
    method, per direction, over the examples both ran on (95 % percentile bootstrap over examples).

    A difference whose CI excludes 0 in the reference's favour (lower in positive perturbation,
    higher in negative) is **bold**, against it *italic*; otherwise the two are not separated.

    Example:
        >>> rows = [dict(method=m, order="positive", model="m", example=e, tokens="t", fraction=f,
        ...              correct=c) for m, c0 in (("a", 0.0), ("b", 1.0)) for e in range(5)
        ...         for f, c in ((0.0, 1.0), (0.1, c0))]
        >>> print(paired_differences(rows, ["a"]).splitlines()[2])
        | b | **-0.50 [-0.50, -0.50]** (5) |
    """
    auc = _auc_by_example(rows)
    dirs = [d for d in ("positive", "negative") if any(k[1] == d for k in auc)]
    refs = [r for r in references if any((r, d) in auc for d in dirs)]
    others = [m for m in dict.fromkeys(k[0] for k in auc) if m not in refs or len(refs) > 1]
    head = ["method"] + [f"{r} − method, AUC ({'pos' if d == 'positive' else 'neg'})" for r in refs for d in dirs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in others:
        cells = [m]
        for r in refs:
            for d in dirs:
                a, b = auc.get((r, d), {}), auc.get((m, d), {})
                common = [k for k in a if k in b]
                if m == r or not common:
                    cells.append("–")
                    continue
                e = metrics.paired_difference_ci(
                    [a[k] for k in common], [b[k] for k in common], n_resamples=n_resamples, seed=seed
                )
                better = e.high < 0 if d == "positive" else e.low > 0
                worse = e.low > 0 if d == "positive" else e.high < 0
                text = f"{e.mean:+.2f} [{e.low:+.2f}, {e.high:+.2f}]"
                cells.append((f"**{text}**" if better else f"*{text}*" if worse else text) + f" ({len(common)})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__getattr__ = moved_names(__name__, {"plot_curves": "tl_tensorlens.viz.plots:plot_perturbation_curves"})

__all__ = [
    "DEFAULT_FRACTIONS",
    "KEY_FIELDS",
    "ORDERS",
    "ClassifierReadout",
    "Example",
    "MethodSummary",
    "NextTokenReadout",
    "Order",
    "PerturbationConfig",
    "Prediction",
    "Readout",
    "default_capture",
    "format_table",
    "load_rows",
    "open_store",
    "paired_differences",
    "per_example_scores",
    "rank_positions",
    "run_perturbation",
    "summarize",
]
