"""The relation-decoding study: seeded splits, faithfulness of the mean tensor vs LRE, results I/O.

Protocol (TensorLens Sec. 4.2 / App. D, after Hernandez et al. 2024). Per relation: align the
samples (most common token length, :func:`align_samples`); per split (seeded) draw ``n_train``
training samples (plus ``n_shots`` context samples with ``few_shot="shared"``); the rest are test
samples, kept only where the true object's first token is in the model's top-``top_k_filter`` at
the last position. Each method predicts the last position's hidden state from the test prompt's
input and decodes it through the unembedding:

* ``faithfulness``: top-1 of the approximation == the model's own top-1 (the paper's metric);
* ``accuracy``: top-1 of the approximation == the true object's first token;
* ``recall@k``: the true object's first token is in the approximation's top-``recall_k``;
* ``random``: 1 / (number of distinct object first tokens of the relation), the chance level of
  guessing among the relation's objects.

Rows go to a :class:`~tl_tensorlens.evaluation.store.ResultStore` (JSONL, ``fsync``'d as each split
finishes, torn tails cut, corrupt lines reported and moved aside), keyed by (model name, model
fingerprint, relation, relation-data hash, split, method, settings); a rerun skips every row already
there, so an interrupted study resumes, and a changed model or relation file is recomputed.
"""

import hashlib
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._checks import as_int
from tl_tensorlens._deprecation import renamed_kwargs, warn_deprecated
from tl_tensorlens.capture import model_fingerprint
from tl_tensorlens.errors import ArgumentError
from tl_tensorlens.evaluation.relations.data import Relation
from tl_tensorlens.evaluation.relations.prompts import (
    AlignedSample,
    FewShot,
    PromptFormat,
    PromptTokenizer,
    RelationPrompt,
    WordTokenizer,
    align_samples,
    build_prompt,
    stack_tokens,
)
from tl_tensorlens.evaluation.store import ResultStore
from tl_tensorlens.methods.relations import (
    LinearRelationEmbedding,
    LinearRelationJVP,
    MeanTensor,
    MeanTensorReplay,
    read_model,
    unembed,
)

__all__ = [
    "KEY_FIELDS",
    "RelationSplit",
    "RelationStudyConfig",
    "comparison_table",
    "decoding_hits",
    "decoding_metrics",
    "item_scores",
    "load_results",
    "lre_method_name",
    "make_split",
    "ok_methods",
    "open_store",
    "relation_digest",
    "results_table",
    "run_relation_study",
    "summarize_results",
]


@dataclass(frozen=True)
class RelationStudyConfig:
    """Settings of a relation-decoding study (everything that changes the numbers).

    Attributes:
        n_train: Training prompts per split (the mean tensor and the LRE average over them).
        n_splits: Number of seeded train/test splits.
        seed: Base seed; split ``i`` uses ``seed * 1000 + i``.
        few_shot: ``"leave_one_out"`` (paper/LRE) or ``"shared"`` (see ``_prompts``).
        n_shots: Context size for ``few_shot="shared"`` (default ``n_train - 1``).
        top_k_filter: Keep test samples whose object is in the model's top-k (paper: 20).
        recall_k: ``k`` of the recall@k metric.
        betas: LRE β grid (LRE's GPT-J / GPT-2-XL value is 2.25).
        lre_blocks: Blocks whose ``hook_resid_pre`` holds the LRE's subject state (0: embedding);
            ``lre_layers=`` is its deprecated name.
        mean_tensor_ablation: Also report the mean tensor without its bias ``c̄``.
        max_test: Cap on test prompts per split (``None``: all).
        template_index: Which prompt template of each relation to use.
        prompt_format: Demo/query format.
    """

    n_train: int = 5
    n_splits: int = 6
    seed: int = 0
    few_shot: FewShot = "leave_one_out"
    n_shots: int | None = None
    top_k_filter: int = 20
    recall_k: int = 5
    betas: tuple[float, ...] = (1.0, 2.25, 5.0)
    lre_blocks: tuple[int, ...] = (0,)
    mean_tensor_ablation: bool = False
    max_test: int | None = None
    template_index: int = 0
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    lre_layers: InitVar[tuple[int, ...] | None] = None

    def __post_init__(self, lre_layers: tuple[int, ...] | None) -> None:
        if lre_layers is not None:
            warn_deprecated("RelationStudyConfig(lre_layers=...)", "lre_blocks=...", stacklevel=4)
            object.__setattr__(self, "lre_blocks", tuple(lre_layers))
        for name in ("n_train", "n_splits", "top_k_filter", "recall_k"):
            as_int(name, getattr(self, name), lo=1)
        for b in self.lre_blocks:
            as_int("lre_blocks", b, lo=0)

    @property
    def shots(self) -> int:
        """Number of demos before every prompt."""
        if self.few_shot == "shared":
            return self.n_train - 1 if self.n_shots is None else self.n_shots
        return self.n_train - 1

    def methods(self) -> list[str]:
        """Method names, in table order."""
        names = ["mean_tensor"] + (["mean_tensor_nobias"] if self.mean_tensor_ablation else [])
        for layer in self.lre_blocks:
            names += [lre_method_name(layer, beta) for beta in self.betas]
        return names

    def fingerprint(self) -> str:
        """Short hash of the settings, stored in every result row."""
        d = asdict(self)
        # Keys written before the rename stay valid: the field was called "lre_layers".
        d["lre_layers"] = d.pop("lre_blocks")
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def lre_method_name(layer: int, beta: float) -> str:
    """``lre_b2.25`` (embedding layer) or ``lre_l3_b2.25``."""
    return f"lre_b{beta:g}" if layer == 0 else f"lre_l{layer}_b{beta:g}"


@dataclass(frozen=True)
class RelationSplit:
    """One seeded split of aligned samples into prompts.

    Attributes:
        index: Split index.
        train: Training prompts (each with its few-shot prefix).
        test: Test prompts (before the top-k filter).
        context: Shared demos (``few_shot="shared"``), else empty.
    """

    index: int
    train: tuple[RelationPrompt, ...]
    test: tuple[RelationPrompt, ...]
    context: tuple[AlignedSample, ...] = ()


def make_split(
    aligned: Sequence[AlignedSample],
    tokenizer: PromptTokenizer | WordTokenizer,
    config: RelationStudyConfig,
    index: int,
) -> RelationSplit | None:
    """Shuffle with seed ``config.seed * 1000 + index`` and build aligned train/test prompts.

    Returns ``None`` when there are too few samples for ``n_train`` (+ context) and one test prompt.

    Example:
        >>> from tl_tensorlens.evaluation.relations import Relation, RelationSample, WordTokenizer, align_samples
        >>> r = Relation("r", ("{} is in",), (), tuple(RelationSample(f"s{i}", f"o{i}") for i in range(6)))
        >>> tok = WordTokenizer.from_relations([r], d_vocab=50)
        >>> split = make_split(align_samples(r, tok), tok, RelationStudyConfig(n_train=3), 0)
        >>> len(split.train), len(split.test), {p.n_pos for p in split.train + split.test}
        (3, 3, {14})
    """
    shots = config.shots if config.few_shot == "shared" else 0
    if len(aligned) < config.n_train + shots + 1:
        return None
    order = list(range(len(aligned)))
    random.Random(config.seed * 1000 + index).shuffle(order)
    picked = [aligned[i] for i in order]
    context, train, test = picked[:shots], picked[shots : shots + config.n_train], picked[shots + config.n_train :]
    if config.few_shot == "shared":
        train_prompts = [build_prompt(q, context, tokenizer) for q in train]
        test_prompts = [build_prompt(q, context, tokenizer) for q in test]
    else:
        train_prompts = [build_prompt(q, [d for d in train if d is not q], tokenizer) for q in train]
        test_prompts = [build_prompt(q, train[:-1], tokenizer) for q in test]
    return RelationSplit(index, tuple(train_prompts), tuple(test_prompts), tuple(context))


def decoding_metrics(
    approx_logits: Float[Tensor, "batch d_vocab"],
    model_logits: Float[Tensor, "batch d_vocab"],
    object_tokens: Int[Tensor, " batch"],
    *,
    recall_k: int = 5,
) -> dict[str, float]:
    """Faithfulness, accuracy and recall@k of approximate logits (pure function).

    Example:
        >>> import torch
        >>> approx = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
        >>> model = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
        >>> decoding_metrics(approx, model, torch.tensor([2, 0]), recall_k=2)
        {'faithfulness': 0.5, 'accuracy': 0.5, 'recall@k': 1.0}
    """
    top1 = approx_logits.argmax(-1)
    k = min(recall_k, approx_logits.shape[-1])
    topk = approx_logits.topk(k, dim=-1).indices
    return {
        "faithfulness": (top1 == model_logits.argmax(-1)).double().mean().item(),
        "accuracy": (top1 == object_tokens).double().mean().item(),
        "recall@k": (topk == object_tokens[:, None]).any(-1).double().mean().item(),
    }


def decoding_hits(
    approx_logits: Float[Tensor, "batch d_vocab"],
    model_logits: Float[Tensor, "batch d_vocab"],
    object_tokens: Int[Tensor, " batch"],
    *,
    recall_k: int = 5,
) -> dict[str, str]:
    """Per test prompt, whether each metric of :func:`decoding_metrics` holds, as a string of ``0``/``1``
    (one character per prompt, in test order; what a result row stores for paired comparisons and CIs).

    Example:
        >>> import torch
        >>> approx = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
        >>> model = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
        >>> decoding_hits(approx, model, torch.tensor([2, 0]), recall_k=2)
        {'faithfulness': '10', 'accuracy': '01', 'recall@k': '11'}
    """
    top1 = approx_logits.argmax(-1)
    k = min(recall_k, approx_logits.shape[-1])
    topk = approx_logits.topk(k, dim=-1).indices
    hits = {
        "faithfulness": top1 == model_logits.argmax(-1),
        "accuracy": top1 == object_tokens,
        "recall@k": (topk == object_tokens[:, None]).any(-1),
    }
    return {name: "".join("1" if h else "0" for h in v.tolist()) for name, v in hits.items()}


#: The fields that identify a row of a relation-study results file.
KEY_FIELDS: tuple[str, ...] = ("model", "model_fingerprint", "relation", "relation_data", "split", "method", "config")


def _upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rows written by 0.1 carried neither the model's fingerprint nor the relation data's hash."""
    row.setdefault("model_fingerprint", "unknown")
    row.setdefault("relation_data", "unknown")
    return row


def open_store(path: str | os.PathLike[str]) -> ResultStore:
    """The results store of a relation study (see the module docstring)."""
    return ResultStore(path, KEY_FIELDS, upgrade=_upgrade_row)


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a results file (missing file: no rows; a torn last line is cut, corrupt lines
    are reported and moved aside, conflicting rows are an error)."""
    return open_store(path).rows


def relation_digest(relation: Relation) -> str:
    """A hash of a relation's templates and samples (part of the resume key)."""
    blob = json.dumps([relation.prompt_templates, [(s.subject, s.object) for s in relation.samples]]).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


OPERATOR_ROUTES = ("auto", "replay", "dense")


def _route(operators: str, n_test: int, d_out: int) -> str:
    """``"replay"`` (apply the operators by replays / JVPs: ``n_train`` per test prompt) or ``"dense"``
    (build ``T̄`` and ``W̄``: ``d_out`` VJPs per training prompt); ``"auto"`` takes the cheaper one.
    Both give the same numbers up to rounding."""
    if operators not in OPERATOR_ROUTES:
        raise ArgumentError("operators", operators, f"one of {OPERATOR_ROUTES}")
    if operators != "auto":
        return operators
    return "replay" if n_test < d_out else "dense"


def _evaluate_split(
    model: Any,
    split: RelationSplit,
    config: RelationStudyConfig,
    methods: Sequence[str],
    base: dict[str, Any],
    batch_size: int,
    operators: str = "auto",
) -> list[dict[str, Any]]:
    test_tokens = stack_tokens(split.test)
    subject_pos = split.test[0].subject_pos
    test_read = read_model(model, test_tokens, subject_pos, layers=config.lre_blocks, batch_size=batch_size)
    objects = torch.tensor([p.object_token for p in split.test], device=test_read.logits.device)
    k = min(config.top_k_filter, test_read.logits.shape[-1])
    known = (test_read.logits.topk(k, dim=-1).indices == objects[:, None]).any(-1)
    keep = torch.nonzero(known).flatten()
    if config.max_test is not None:
        keep = keep[: config.max_test]
    info = {
        **base,
        "n_train": len(split.train),
        "n_test_candidates": len(split.test),
        "n_test": int(keep.numel()),
        "model_accuracy": (test_read.logits[keep].argmax(-1) == objects[keep]).double().mean().item()
        if keep.numel()
        else math.nan,
    }
    if keep.numel() == 0:
        return [
            {**info, "method": m, "status": "skipped", "reason": "no test object in the model's top-k"} for m in methods
        ]

    model_logits, objects = test_read.logits[keep], objects[keep]
    route = _route(operators, int(keep.numel()), test_read.final.shape[-1])
    info["operator"] = route
    predictions: dict[str, Tensor] = {}
    train_tokens = stack_tokens(split.train)
    if any(m.startswith("mean_tensor") for m in methods):
        x = test_read.x0[keep]
        mean: MeanTensor | MeanTensorReplay = MeanTensorReplay.fit(model, train_tokens, batch_size=batch_size)
        if route == "dense":
            mean = mean.materialize()
        y = mean.apply(x)
        if "mean_tensor" in methods:
            predictions["mean_tensor"] = unembed(model, y.to(model_logits.dtype))
        if "mean_tensor_nobias" in methods:
            # T̄x = (T̄x + c̄) − c̄: one replay per training prompt instead of a JVP per test prompt
            # (the subtraction costs float rounding of |c̄|, far below a top-1 margin).
            predictions["mean_tensor_nobias"] = unembed(model, (y - mean.bias).to(model_logits.dtype))
    for layer in config.lre_blocks:
        wanted = [b for b in config.betas if lre_method_name(layer, b) in methods]
        if not wanted:
            continue
        s = test_read.subject[layer][keep]
        subject_pos = split.train[0].subject_pos
        if route == "dense":
            lre = LinearRelationEmbedding.fit(model, train_tokens, subject_pos, layer=layer)
            approx = {beta: lre.with_beta(beta).apply(s) for beta in wanted}
        else:
            lazy = LinearRelationJVP.fit(model, train_tokens, subject_pos, layer=layer, batch_size=batch_size)
            ws = lazy.weight_apply(s)  # W̄ s once, shared by every β
            approx = {beta: lazy.with_beta(beta).apply(s, weight=ws) for beta in wanted}
        for beta, y in approx.items():
            predictions[lre_method_name(layer, beta)] = unembed(model, y.to(model_logits.dtype))
    rows = []
    for method in methods:
        metrics = decoding_metrics(predictions[method], model_logits, objects, recall_k=config.recall_k)
        hits = decoding_hits(predictions[method], model_logits, objects, recall_k=config.recall_k)
        rows.append({**info, "method": method, "status": "ok", **metrics, "hits": hits})
    return rows


@renamed_kwargs(results_path="out")
@torch.no_grad()
def run_relation_study(
    model: Any,
    relations: Sequence[Relation],
    config: RelationStudyConfig = RelationStudyConfig(),
    *,
    tokenizer: PromptTokenizer | WordTokenizer | None = None,
    model_name: str = "model",
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    operators: str = "auto",
) -> list[dict[str, Any]]:
    """Run (or resume) the mean-tensor vs LRE study over relations and seeded splits.

    Args:
        model: A TransformerLens model (HookedTransformer or TransformerBridge).
        relations: Relations to study.
        config: Study settings.
        tokenizer: Tokenizer adapter; default ``PromptTokenizer.from_model(model)``.
        model_name: Stored in every row (one results file can hold several models).
        out: JSONL results file (``results_path=`` is its deprecated name); existing rows with the
            same key (:data:`KEY_FIELDS`: model name and fingerprint, relation and its data hash,
            split, method, settings) are reused and not recomputed.
        batch_size: Prompts per batched forward.
        progress: Show tqdm bars.
        operators: How the operators are evaluated: ``"replay"`` applies them to the test prompts by
            replays and JVPs (``n_train`` per test prompt, :class:`~tl_tensorlens.methods.relations.MeanTensorReplay`),
            ``"dense"`` builds ``T̄`` and ``W̄`` (``d_model`` VJPs per training prompt), ``"auto"``
            (default) takes the cheaper per split. The numbers agree to rounding, so the choice is not
            part of the resume key; each row records it under ``operator``.

    Returns:
        One row per (relation, split, method): the settings, ``status`` (``ok``/``skipped``),
        ``n_test``, ``random``, and the metrics of :func:`decoding_metrics`.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> from tl_tensorlens.evaluation.relations import Relation, RelationSample, WordTokenizer
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=40, n_ctx=32,
        ...                               d_mlp=64, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64).eval()
        >>> r = Relation("r", ("{} is in",), (), tuple(RelationSample(f"s{i}", f"o{i % 3}") for i in range(8)))
        >>> tok = WordTokenizer.from_relations([r], d_vocab=40)
        >>> rows = run_relation_study(model, [r], RelationStudyConfig(n_train=3, n_splits=2, top_k_filter=40,
        ...                           betas=(1.0,)), tokenizer=tok, progress=False)
        >>> sorted({row["method"] for row in rows}), len(rows)
        (['lre_b1', 'mean_tensor'], 4)
    """
    _route(operators, 0, 1)  # reject a bad value before any work
    tok = PromptTokenizer.from_model(model) if tokenizer is None else tokenizer
    store = open_store(out) if out is not None else None
    fingerprint = config.fingerprint()
    model_fp = model_fingerprint(model)
    methods = config.methods()
    result: list[dict[str, Any]] = []
    todo = [(r, i) for r in relations for i in range(config.n_splits)]
    bar: Any = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="relation splits")
    aligned_cache: dict[str, tuple[AlignedSample, ...]] = {}
    digests: dict[str, str] = {}
    for relation, index in todo:
        rel_fp = digests.setdefault(relation.key, relation_digest(relation))
        keys = {m: (model_name, model_fp, relation.key, rel_fp, index, m, fingerprint) for m in methods}
        stored = {m: store.get(k) if store is not None else None for m, k in keys.items()}
        have = [r for r in stored.values() if r is not None]
        missing = [m for m, r in stored.items() if r is None]
        if bar is not None:
            bar.set_postfix_str(f"{relation.key} #{index}")
        if missing:
            if relation.key not in aligned_cache:
                aligned_cache[relation.key] = align_samples(
                    relation,
                    tok,
                    template_index=config.template_index,
                    fmt=config.prompt_format,
                    few_shot=config.few_shot,
                )
            aligned = aligned_cache[relation.key]
            objects = {a.object_token for a in aligned}
            base = {
                "model": model_name,
                "model_fingerprint": model_fp,
                "relation": relation.key,
                "relation_data": rel_fp,
                "relation_type": relation.relation_type,
                "split": index,
                "seed": config.seed * 1000 + index,
                "config": fingerprint,
                "n_samples": len(relation.samples),
                "n_aligned": len(aligned),
                "random": 1.0 / len(objects) if objects else math.nan,
            }
            split = make_split(aligned, tok, config, index)
            if split is None:
                new = [
                    {
                        **base,
                        "method": m,
                        "status": "skipped",
                        "n_test": 0,
                        "reason": f"{len(aligned)} aligned samples < n_train + shots + 1",
                    }
                    for m in missing
                ]
            else:
                new = _evaluate_split(model, split, config, missing, base, batch_size, operators)
            if store is not None:
                store.append(new)
            have += new
        result += sorted(have, key=lambda r: methods.index(r["method"]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return result


def summarize_results(rows: Iterable[dict[str, Any]], metric: str = "faithfulness") -> dict[str, dict[str, Any]]:
    """Mean and sample std (ddof=1) of ``metric`` over splits, per relation and method.

    Returns:
        ``{relation: {"random": float, "n_test": float, "n_splits": int, "methods": {method: (mean, std, n)}}}``;
        skipped splits are left out.

    Example:
        >>> rows = [{"relation": "r", "method": "m", "status": "ok", "faithfulness": f, "random": 0.5,
        ...          "n_test": 4, "split": i} for i, f in enumerate([0.5, 1.0])]
        >>> summarize_results(rows)["r"]["methods"]["m"]
        (0.75, 0.3535533905932738, 2)
    """
    grouped: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    extra: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    splits: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        if row.get("status") != "ok":
            continue
        rel = row["relation"]
        grouped[rel][row["method"]].append(float(row[metric]))
        if row["split"] not in splits[rel]:
            splits[rel].add(row["split"])
            extra[rel]["random"].append(float(row["random"]))
            extra[rel]["n_test"].append(float(row["n_test"]))
    summary: dict[str, dict[str, Any]] = {}
    for rel, methods in grouped.items():
        stats = {}
        for method, values in methods.items():
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
            stats[method] = (mean, std, n)
        summary[rel] = {
            "random": sum(extra[rel]["random"]) / len(extra[rel]["random"]),
            "n_test": sum(extra[rel]["n_test"]) / len(extra[rel]["n_test"]),
            "n_splits": len(splits[rel]),
            "methods": stats,
        }
    return summary


def ok_methods(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The methods with at least one ``ok`` row, in first-seen order (the default column order)."""
    return list(dict.fromkeys(row["method"] for row in rows if row.get("status") == "ok"))


def results_table(
    rows: Iterable[dict[str, Any]], metric: str = "faithfulness", methods: Sequence[str] | None = None
) -> str:
    """A Markdown table: one line per relation, ``mean ± std`` over splits per method, best in bold.

    Example:
        >>> rows = [{"relation": "r", "method": m, "status": "ok", "faithfulness": f, "random": 0.5,
        ...          "n_test": 4, "split": 0} for m, f in [("mean_tensor", 1.0), ("lre_b1", 0.5)]]
        >>> print(results_table(rows))
        | relation | splits | n_test | random | mean_tensor | lre_b1 |
        |---|---|---|---|---|---|
        | r | 1 | 4.0 | 0.50 | **1.00 ± 0.00** | 0.50 ± 0.00 |
        | **mean** | | | 0.50 | **1.00** | 0.50 |
    """
    rows = list(rows)
    summary = summarize_results(rows, metric)
    if methods is None:
        methods = ok_methods(rows)
    header = ["relation", "splits", "n_test", "random", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals: dict[str, list[float]] = defaultdict(list)
    for rel in sorted(summary):
        s = summary[rel]
        stats = s["methods"]
        best = max((stats[m][0] for m in methods if m in stats), default=math.nan)
        cells = []
        for m in methods:
            if m not in stats:
                cells.append("–")
                continue
            mean, std, _ = stats[m]
            totals[m].append(mean)
            text = f"{mean:.2f} ± {std:.2f}"
            cells.append(f"**{text}**" if mean == best else text)
        totals["random"].append(s["random"])
        lines.append(f"| {rel} | {s['n_splits']} | {s['n_test']:.1f} | {s['random']:.2f} | " + " | ".join(cells) + " |")
    if summary:
        means = {m: sum(v) / len(v) for m, v in totals.items() if v}
        best = max((means[m] for m in methods if m in means), default=math.nan)
        cells = [
            ("–" if m not in means else (f"**{means[m]:.2f}**" if means[m] == best else f"{means[m]:.2f}"))
            for m in methods
        ]
        lines.append(f"| **mean** | | | {means.get('random', math.nan):.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def item_scores(rows: Iterable[dict[str, Any]], metric: str = "faithfulness") -> dict[str, dict[str, list[float]]]:
    """Per relation and method, the per-prompt 0/1 scores of ``metric`` pooled over splits (split order,
    then test order, so two methods' lists are paired item by item). Rows without per-prompt ``hits``
    (written before 0.3) are left out.

    Example:
        >>> rows = [{"relation": "r", "method": "m", "status": "ok", "split": 0, "hits": {"faithfulness": "10"}},
        ...         {"relation": "r", "method": "m", "status": "ok", "split": 1, "hits": {"faithfulness": "1"}}]
        >>> item_scores(rows)
        {'r': {'m': [1.0, 0.0, 1.0]}}
    """
    out: dict[str, dict[str, list[float]]] = defaultdict(dict)
    ordered = sorted(
        (r for r in rows if r.get("status") == "ok" and metric in (r.get("hits") or {})),
        key=lambda r: (r["relation"], r["method"], r["split"]),
    )
    for row in ordered:
        out[row["relation"]].setdefault(row["method"], []).extend(float(c) for c in row["hits"][metric])
    return dict(out)


def comparison_table(
    rows: Iterable[dict[str, Any]],
    metric: str = "faithfulness",
    *,
    reference: str = "mean_tensor",
    others: Sequence[str] | None = None,
    by_type: bool = False,
    n_resamples: int = 2000,
    seed: int = 0,
) -> str:
    """Relation by relation: ``reference`` against each other method, paired over the same test prompts.

    Per relation the 95 % percentile-bootstrap CI of the mean difference (resampling test prompts,
    pooled over splits) decides a **win** (CI above 0), **loss** (below 0) or **tie**. The first table
    has one line per relation (the reference's score with its CI, and for every other method the
    difference with its CI); the second counts wins / ties / losses per method (and, with
    ``by_type=True``, per relation type) and gives the mean difference over relations with a CI
    resampling relations.

    Example:
        >>> rows = [{"relation": "r", "method": m, "status": "ok", "split": 0, "relation_type": "t",
        ...          "hits": {"faithfulness": h}} for m, h in [("mean_tensor", "1111"), ("lre_b1", "0000")]]
        >>> print(comparison_table(rows).splitlines()[2])
        | r | t | 4 | 1.00 [1.00, 1.00] | **+1.00 [+1.00, +1.00]** |
    """
    from tl_tensorlens.evaluation.metrics import bootstrap_ci, paired_difference_ci

    rows = list(rows)
    scores = item_scores(rows, metric)
    types = {r["relation"]: r.get("relation_type", "") for r in rows}
    if others is None:
        others = [m for m in ok_methods(rows) if m != reference]
    header = ["relation", "type", "n", f"{reference} {metric}", *[f"{reference} − {m}" for m in others]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tally: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    diffs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rel in sorted(scores, key=lambda r: (types.get(r, ""), r)):
        per = scores[rel]
        if reference not in per:
            continue
        ref = per[reference]
        est = bootstrap_ci(ref, n_resamples=n_resamples, seed=seed)
        cells = [f"{est.mean:.2f} [{est.low:.2f}, {est.high:.2f}]"]
        for m in others:
            if m not in per or len(per[m]) != len(ref):
                cells.append("–")
                continue
            d = paired_difference_ci(ref, per[m], n_resamples=n_resamples, seed=seed)
            verdict = 0 if d.low > 0 else (2 if d.high < 0 else 1)
            for group in ("all", types.get(rel, "")):
                diffs[(m, group)].append(d.mean)
                tally[(m, group)][verdict] += 1
            text = f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
            cells.append(f"**{text}**" if verdict == 0 else (f"_{text}_" if verdict == 2 else text))
        lines.append(f"| {rel} | {types.get(rel, '')} | {len(ref)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| {reference} vs | relation type | relations | wins | ties | losses | mean difference over relations [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = ["all", *sorted({g for g in types.values() if g} if by_type else set())]
    for m in others:
        for group in groups:
            if not diffs.get((m, group)):
                continue
            w, t, los = tally[(m, group)]
            d = bootstrap_ci(diffs[(m, group)], n_resamples=n_resamples, seed=seed)
            lines.append(
                f"| {m} | {group} | {len(diffs[(m, group)])} | {w} | {t} | {los} | "
                f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |"
            )
    return "\n".join(lines)
