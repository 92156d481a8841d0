"""A sentence-polarity classifier on all-MiniLM-L6-v2: a linear head on the frozen [CLS] state.

This is the project's stand-in for the paper's BERT-on-IMDB experiment. The head reads one
output position of the last layer (``[CLS]``, position 0), ``logits = h_cls @ W + b`` with
``W [d_model, n_classes]``, so for a TensorLens tensor ``T[n_out, d_out, n_in, d_in]`` of the
encoder, ``W[:, c] @ T[0]`` is the class-``c`` projection: the contribution of every input
token and feature to the class logit (up to ``b``, which is input-independent).

**Frozen encoder, trained head.** The encoder stays the real, published MiniLM (so the tensor
is the tensor of a real model, not of a fine-tune we would have to ship); only 384 x 2 + 2
numbers are trained, which fits in the package (a 3 kB safetensors file), trains in seconds once
the [CLS] features are computed, and reaches the required >= 0.70 held-out accuracy (see
``docs/subjects.md`` for the measured value).

Data: sentence polarity v1.0 (Pang and Lee 2005; ``rt-polarity.pos``/``.neg``, latin-1,
5,331 + 5,331 sentences), read by path from ``$TL_TENSORLENS_DATA/text``
(or an explicit ``path``); seeded 80/10/10 train/validation/test split.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._paths import data_dir as _data_dir
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects._training import CHECKPOINT_DIR

LABELS: tuple[str, ...] = ("negative", "positive")
HEAD_FILE = CHECKPOINT_DIR / "polarity_head.safetensors"
MAX_LEN = 64


def data_dir() -> Path:
    """The data folder ``$TL_TENSORLENS_DATA`` (see :func:`tl_tensorlens._paths.data_dir`).

    Raises:
        DataError: the variable is unset or names no folder (the message says what to do).
    """
    return _data_dir()


@dataclass(frozen=True)
class PolaritySplit:
    """One split of the polarity data: sentences and labels (0 negative, 1 positive)."""

    sentences: list[str]
    labels: Int[Tensor, " n"]


@dataclass(frozen=True)
class PolarityData:
    """The seeded train/validation/test split of sentence polarity v1.0."""

    train: PolaritySplit
    val: PolaritySplit
    test: PolaritySplit


def load_polarity_data(seed: int = 0, path: str | Path | None = None) -> PolarityData:
    """Read ``rt-polarity.{pos,neg}`` and split 80/10/10 with a seeded permutation.

    Args:
        seed: seeds the permutation (``torch.Generator``).
        path: a folder holding ``rt-polarity.pos`` and ``rt-polarity.neg`` (default
            ``data_dir() / "text"``).

    Raises:
        TensorLensError: the files are missing.

    Example:
        >>> data = load_polarity_data()  # doctest: +SKIP
        >>> len(data.train.sentences), len(data.test.sentences)  # doctest: +SKIP
        (8530, 1066)
    """
    folder = Path(path) if path is not None else data_dir() / "text"
    sentences: list[str] = []
    labels: list[int] = []
    for label, suffix in ((0, "neg"), (1, "pos")):
        file = folder / f"rt-polarity.{suffix}"
        if not file.is_file():
            raise TensorLensError(f"sentence polarity file {file} not found")
        # The corpus is latin-1 (it predates UTF-8 cleaning), one sentence per line.
        lines = [ln.strip() for ln in file.read_text(encoding="latin-1").splitlines()]
        lines = [ln for ln in lines if ln]
        sentences += lines
        labels += [label] * len(lines)
    perm = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
    y = torch.tensor(labels)[perm]
    s = [sentences[i] for i in perm]
    n_test = n_val = len(s) // 10
    n_train = len(s) - n_val - n_test
    return PolarityData(
        train=PolaritySplit(s[:n_train], y[:n_train]),
        val=PolaritySplit(s[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        test=PolaritySplit(s[n_train + n_val :], y[n_train + n_val :]),
    )


def cls_features(
    sentences: list[str], *, batch_size: int = 64, max_len: int = MAX_LEN, hf_model: Any = None
) -> Float[Tensor, "n d_model"]:
    """Final-layer ``[CLS]`` states of MiniLM (``BertModel(...).last_hidden_state[:, 0]``), float32.

    Uses ``transformers`` directly (padded batches with an attention mask; right padding does not
    change position 0), which TL's MiniLM reproduces to ~2e-6 (see ``tests/test_subjects_minilm.py``).

    Args:
        sentences: raw text.
        batch_size: sentences per forward pass.
        max_len: truncation length in tokens (including ``[CLS]`` and ``[SEP]``).
        hf_model: a loaded ``BertModel`` to reuse (default: load MiniLM).

    Example:
        >>> cls_features(["a gorgeous , witty , seductive movie ."]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    from transformers import AutoTokenizer, BertModel

    from tl_tensorlens.subjects.loading import minilm_path

    folder = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = hf_model or BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    # Sorting by length keeps padding (wasted compute) small; the order is restored below.
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            enc = tok(
                [sentences[j] for j in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            out[idx] = model(**enc).last_hidden_state[:, 0].float()
    return out


@dataclass(frozen=True)
class PolarityHead:
    """A linear classifier on the final-layer state at one position: ``logits = h @ W + b``.

    Attributes:
        W: ``[d_model, n_classes]``; ``W[:, c]`` is the class-``c`` readout direction.
        b: ``[n_classes]``.
        labels: class names, ``("negative", "positive")``.
        position: the output position read (0 = ``[CLS]``).
        metrics: accuracies and the recipe recorded at training time.
    """

    W: Float[Tensor, "d_model n_classes"]
    b: Float[Tensor, " n_classes"]
    labels: tuple[str, ...]
    position: int
    metrics: dict[str, Any] = field(default_factory=dict)

    def logits(self, hidden: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch n_classes"]:
        """Class logits from final-layer states at :attr:`position`."""
        return hidden.to(self.W.dtype) @ self.W + self.b

    def __repr__(self) -> str:
        return (
            f"PolarityHead(W={tuple(self.W.shape)}, labels={self.labels}, "
            f"position={self.position}, test_acc={self.metrics.get('test_acc')})"
        )


def fit_linear_head(
    x: Float[Tensor, "n d_model"],
    y: Int[Tensor, " n"],
    *,
    weight_decay: float,
    steps: int = 300,
    seed: int = 0,
) -> tuple[Float[Tensor, "d_model n_classes"], Float[Tensor, " n_classes"]]:
    """Multinomial logistic regression (full-batch L-BFGS, float64) on standardised features,
    folded back so that ``x @ W + b`` works on the raw features.

    Standardising makes one ``weight_decay`` meaningful across features of different scale;
    folding keeps the shipped head a plain linear map of the model's own hidden state.
    """
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    n_classes = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(z.shape[1], n_classes, generator=gen, dtype=torch.float64) * 1e-3).requires_grad_()
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = w.detach() / std[:, None]
    b_raw = b.detach() - mean @ w_raw
    return w_raw, b_raw


def accuracy(head: PolarityHead, x: Float[Tensor, "n d_model"], y: Int[Tensor, " n"]) -> float:
    """Top-1 accuracy of ``head`` on features ``x`` with labels ``y``."""
    return (head.logits(x).argmax(-1) == y).double().mean().item()


@dataclass(frozen=True)
class PolarityConfig:
    """The polarity-head recipe (defaults = the shipped head)."""

    seed: int = 0
    max_len: int = MAX_LEN
    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    n_train: int | None = None  # None: all; small values for tests


def train_polarity(config: PolarityConfig = PolarityConfig(), data: PolarityData | None = None) -> PolarityHead:
    """Fit the polarity head on frozen MiniLM [CLS] states; pick weight decay on validation.

    Example:
        >>> head = train_polarity(PolarityConfig(n_train=64))  # doctest: +SKIP
        >>> head.W.shape  # doctest: +SKIP
        torch.Size([384, 2])
    """
    import time

    from transformers import BertModel

    from tl_tensorlens.subjects.loading import minilm_path

    if not config.weight_decays:
        raise TensorLensError("PolarityConfig.weight_decays must name at least one value")
    start = time.perf_counter()
    data = data or load_polarity_data(config.seed)
    hf = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    train = data.train.sentences[: config.n_train]
    y_train = data.train.labels[: config.n_train]
    x_train = cls_features(train, max_len=config.max_len, hf_model=hf)
    x_val = cls_features(data.val.sentences, max_len=config.max_len, hf_model=hf)
    x_test = cls_features(data.test.sentences, max_len=config.max_len, hf_model=hf)
    features_s = time.perf_counter() - start
    best: tuple[float, float, PolarityHead] | None = None
    for wd in config.weight_decays:
        W, b = fit_linear_head(x_train, y_train, weight_decay=wd, seed=config.seed)
        head = PolarityHead(W.float(), b.float(), LABELS, 0)
        val = accuracy(head, x_val, data.val.labels)
        if best is None or val > best[0]:
            best = (val, wd, head)
    val_acc, wd, head = best  # type: ignore[misc]  # non-empty weight_decays, checked above
    metrics = {
        "train_acc": accuracy(head, x_train, y_train),
        "val_acc": val_acc,
        "test_acc": accuracy(head, x_test, data.test.labels),
        "n_train": len(train),
        "n_val": len(data.val.sentences),
        "n_test": len(data.test.sentences),
        "weight_decay": wd,
        "seed": config.seed,
        "max_len": config.max_len,
        "encoder": "all-MiniLM-L6-v2 (frozen)",
        "features_seconds": features_s,
        "total_seconds": time.perf_counter() - start,
    }
    return PolarityHead(head.W, head.b, LABELS, 0, metrics)


def save_polarity_head(head: PolarityHead, path: str | Path = HEAD_FILE) -> Path:
    """Write the head as safetensors (W, b) with labels, position and metrics in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"W": head.W.contiguous(), "b": head.b.contiguous()},
        str(path),
        metadata={
            "labels": json.dumps(list(head.labels)),
            "position": str(head.position),
            "metrics": json.dumps(head.metrics),
        },
    )
    return path


def load_polarity_head(path: str | Path = HEAD_FILE) -> PolarityHead:
    """Load the shipped polarity head (no pickle: safetensors).

    Returns:
        A frozen :class:`PolarityHead`; ``W`` is ``[384, 2]`` float32 for classes
        ``("negative", "positive")`` at position 0 (``[CLS]``).

    Example:
        >>> head = load_polarity_head()
        >>> head.W.shape, head.labels, head.position
        (torch.Size([384, 2]), ('negative', 'positive'), 0)
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TensorLensError(f"polarity head {path} not found (rebuild: scripts/train_polarity.py)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        W, b = f.get_tensor("W"), f.get_tensor("b")
    return PolarityHead(
        W=W,
        b=b,
        labels=tuple(json.loads(meta.get("labels", json.dumps(list(LABELS))))),
        position=int(meta.get("position", "0")),
        metrics=json.loads(meta.get("metrics", "{}")),
    )
