"""A small word-level GPT-2 language model trained here on WikiText-2 raw text: a generic decoder.

The other project-trained decoders have synthetic data with known answers; this one reads real
English, so the perturbation study can ask the paper's decoder question on natural text. The only
WikiText file at hand is the raw **test** split (``<data>/text/wikitext-2-raw-test.txt``, 62
articles, 241k words, CC BY-SA 3.0), so it is split again here, by article: every
``heldout_every``-th article is held out, the others train the model.

Tokenization: lower-cased, split on whitespace (the raw text already separates punctuation), the
``vocab_size - 4`` most frequent training words after the four special tokens, everything else
``<unk>``. The vocabulary derives from the text, so the checkpoint is **not committed**: it is
rebuilt by ``scripts/train_wikitext.py`` (or :func:`build_wikitext_subject`) into a cache folder,
``$TL_TENSORLENS_CACHE/subjects/wikitext`` (default ``~/.cache/tl_tensorlens``), in minutes.
"""

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_tensorlens._paths import cache_dir, data_dir
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects._training import (
    SPECIAL_TOKENS,
    TrainLog,
    gpt2_model,
    logits_of,
    metrics_table,
    save_checkpoint,
    train_lm,
    training_section,
    word_tokenizer,
)

WIKITEXT_FILE = Path("text") / "wikitext-2-raw-test.txt"
BOS_ID = SPECIAL_TOKENS.index("<bos>")
UNK_ID = SPECIAL_TOKENS.index("<unk>")
_TITLE = re.compile(r"^ = [^=].* = ?$")


@dataclass(frozen=True)
class WikiTextConfig:
    """Model size, vocabulary, split and training recipe (defaults = the documented subject)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    n_ctx: int = 64
    vocab_size: int = 4000
    heldout_every: int = 10
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 256


@dataclass(frozen=True)
class WikiTextCorpus:
    """The article split of the WikiText-2 raw test file, as lower-cased word lists."""

    train_articles: list[list[str]]
    heldout_articles: list[list[str]]


@dataclass(frozen=True)
class WikiTextResult:
    """A trained model with its tokenizer, config, training log and held-out metrics."""

    model: Any
    tokenizer: Any
    config: WikiTextConfig
    log: TrainLog
    metrics: dict[str, float]


def wikitext_path(path: str | Path | None = None) -> Path:
    """The WikiText-2 raw test file: ``path``, else ``<data>/text/wikitext-2-raw-test.txt``.

    Raises:
        TensorLensError: the file is absent (the message names where it was looked for).
    """
    file = Path(path) if path is not None else data_dir() / WIKITEXT_FILE
    if not file.is_file():
        raise TensorLensError(f"WikiText-2 raw text not found at {file}; pass path= or set TL_TENSORLENS_DATA")
    return file


def split_articles(text: str, heldout_every: int = 10) -> WikiTextCorpus:
    """Split raw WikiText into articles at their `` = Title = `` lines; every ``heldout_every``-th
    article (counting from 0) is held out. Words are lower-cased and whitespace-split.

    Example:
        >>> text = " = A = \\n Alpha beta .\\n = = Sub = = \\n Gamma .\\n = B = \\n Delta .\\n"
        >>> c = split_articles(text, heldout_every=2)
        >>> c.heldout_articles, c.train_articles
        ([['=', 'a', '=', 'alpha', 'beta', '.', '=', '=', 'sub', '=', '=', 'gamma', '.']], [['=', 'b', '=', 'delta', '.']])
    """
    if heldout_every < 2:
        raise TensorLensError(f"heldout_every must be >= 2 (got {heldout_every}): at least one article must train")
    articles: list[list[str]] = []
    for line in text.splitlines():
        if _TITLE.match(line):
            articles.append([])
        if not line.strip():
            continue
        if not articles:
            articles.append([])
        articles[-1].extend(line.lower().split())
    train = [a for i, a in enumerate(articles) if i % heldout_every]
    heldout = [a for i, a in enumerate(articles) if not i % heldout_every]
    return WikiTextCorpus(train, heldout)


def load_wikitext(config: WikiTextConfig = WikiTextConfig(), path: str | Path | None = None) -> WikiTextCorpus:
    """Read the WikiText-2 raw test file and split it by article (:func:`split_articles`)."""
    return split_articles(wikitext_path(path).read_text(encoding="utf-8"), config.heldout_every)


def wikitext_tokenizer(train_articles: list[list[str]], vocab_size: int) -> Any:
    """Word-level tokenizer: the ``vocab_size - 4`` most frequent training words (ties broken
    alphabetically, so the vocabulary is deterministic) after the special tokens."""
    n_words = vocab_size - len(SPECIAL_TOKENS)
    if n_words < 1:
        raise TensorLensError(f"vocab_size {vocab_size} leaves no room for words after {len(SPECIAL_TOKENS)} specials")
    counts = Counter(w for a in train_articles for w in a if w not in SPECIAL_TOKENS)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n_words]]
    return word_tokenizer(words)


def encode_articles(tokenizer: Any, articles: list[list[str]]) -> Int[Tensor, " n_tokens"]:
    """One id stream of the articles, in order (word ids; ``<unk>`` outside the vocabulary)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(w, UNK_ID) for a in articles for w in a]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: Int[Tensor, " n"], n_ctx: int) -> Int[Tensor, "n_windows n_ctx"]:
    """Non-overlapping ``<bos>``-prefixed windows of ``n_ctx`` tokens over a stream (the tail
    shorter than a window is dropped)."""
    body = n_ctx - 1
    n = stream.shape[0] // body
    if n == 0:
        raise TensorLensError(f"a stream of {stream.shape[0]} tokens holds no window of {body}")
    w = stream[: n * body].reshape(n, body)
    return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.long), w], dim=1)


def evaluate_wikitext(model: Any, tokens: Int[Tensor, "batch pos"], *, batch: int = 64) -> dict[str, float]:
    """Next-token loss, perplexity and top-1 accuracy on ``<bos>``-prefixed windows.

    ``acc_known`` counts only targets inside the vocabulary (an ``<unk>`` target is easy to guess
    and says little); ``unk_rate`` is the share of ``<unk>`` targets. Works for HF models and
    TransformerLens models alike.
    """
    total_loss, n, correct, n_known, correct_known, n_unk = 0.0, 0, 0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            t = tokens[start : start + batch]
            logits = logits_of(model, t)[:, :-1].double()
            target = t[:, 1:]
            total_loss += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), reduction="sum"
            ).item()
            pred = logits.argmax(-1)
            known = target != UNK_ID
            n += target.numel()
            correct += int((pred == target).sum())
            n_known += int(known.sum())
            correct_known += int((pred == target)[known].sum())
            n_unk += int((~known).sum())
    loss = total_loss / n
    return {
        "loss": loss,
        "perplexity": float(torch.tensor(loss).exp()),
        "acc": correct / n,
        "acc_known": correct_known / max(1, n_known),
        "unk_rate": n_unk / n,
    }


def train_wikitext(config: WikiTextConfig = WikiTextConfig(), path: str | Path | None = None) -> WikiTextResult:
    """Train the WikiText subject (seeded, single-threaded CPU; a few minutes at the defaults).

    Each step draws ``batch_size`` random ``<bos>``-prefixed windows from the training stream
    (seeded per step); evaluation uses the non-overlapping windows of the held-out articles.

    Example:
        >>> r = train_wikitext(WikiTextConfig(steps=4, d_model=16, vocab_size=64, n_ctx=16,
        ...     eval_every=2, eval_windows=4))  # doctest: +SKIP
        >>> sorted(r.metrics)[:2]  # doctest: +SKIP
        ['heldout_acc', 'heldout_acc_known']
    """
    corpus = load_wikitext(config, path)
    tokenizer = wikitext_tokenizer(corpus.train_articles, config.vocab_size)
    train_stream = encode_articles(tokenizer, corpus.train_articles)
    heldout = windows(encode_articles(tokenizer, corpus.heldout_articles), config.n_ctx)
    eval_tokens = heldout[: config.eval_windows]
    model = gpt2_model(config, d_vocab=config.vocab_size)
    body = config.n_ctx - 1
    if train_stream.shape[0] <= body:
        raise TensorLensError(f"the training articles hold {train_stream.shape[0]} tokens, fewer than one window")

    def batch_fn(step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step + 1)
        starts = torch.randint(0, train_stream.shape[0] - body, (config.batch_size,), generator=gen)
        w = torch.stack([train_stream[s : s + body] for s in starts.tolist()])
        tokens = torch.cat([torch.full((config.batch_size, 1), BOS_ID, dtype=torch.long), w], dim=1)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    def eval_fn() -> dict[str, float]:
        r = evaluate_wikitext(model, eval_tokens)
        return {"heldout_loss": r["loss"], "heldout_acc_known": r["acc_known"]}

    log = train_lm(model, config, batch_fn, eval_fn)
    final = evaluate_wikitext(model, eval_tokens)
    metrics: dict[str, float] = {f"heldout_{k}": v for k, v in final.items()}
    metrics["heldout_windows"] = float(eval_tokens.shape[0])
    metrics["train_tokens"] = float(train_stream.shape[0])
    metrics["train_seconds"] = log.seconds
    return WikiTextResult(model, tokenizer, config, log, metrics)


def wikitext_card(result: WikiTextResult) -> str:
    """The model card (markdown) of a trained WikiText model."""
    c = result.config
    n_params = sum(p.numel() for p in result.model.parameters())
    return f"""# tl_tensorlens wikitext subject

A {c.n_layers}-layer `GPT2LMHeadModel` (d_model {c.d_model}, {c.n_heads} heads, MLPs, learned
positions, n_ctx {c.n_ctx}, word vocabulary {c.vocab_size}, {n_params:,} parameters, tied
embeddings) trained by `scripts/train_wikitext.py` in plain PyTorch. Built locally, never committed:
its vocabulary derives from the text.

## Data
WikiText-2 raw, **test** split (the only split at hand; CC BY-SA 3.0, Merity et al. 2016), split
again by article: every {c.heldout_every}th article held out, the rest train the model
({int(result.metrics["train_tokens"]):,} training tokens). Lower-cased, whitespace-split words;
the {c.vocab_size - len(SPECIAL_TOKENS)} most frequent training words, the rest `<unk>`.

{training_section(c, result.log)}

`heldout_*` = the first {c.eval_windows} non-overlapping `<bos>`-prefixed windows of the held-out articles.

## Final metrics (held-out)
`heldout_acc_known`: top-1 accuracy on targets inside the vocabulary; `heldout_unk_rate`: share of
`<unk>` targets.

{metrics_table(result.metrics)}

Config: `{asdict(c)}`
"""


def wikitext_cache_dir() -> Path:
    """Where the WikiText subject is built: ``<cache>/subjects/wikitext`` (see
    :func:`tl_tensorlens._paths.cache_dir`: ``$TL_TENSORLENS_CACHE``, default ``~/.cache/tl_tensorlens``)."""
    return cache_dir() / "subjects" / "wikitext"


def build_wikitext_subject(
    out: str | Path | None = None, config: WikiTextConfig = WikiTextConfig(), *, path: str | Path | None = None
) -> Path:
    """Train and save the WikiText subject as a Hugging Face checkpoint folder (model card and
    metrics included); returns the folder. Single-threaded while training, for determinism.

    Args:
        out: the folder (default :func:`wikitext_cache_dir`).
        config: the recipe.
        path: the WikiText raw text file (default: the shared data folder).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_wikitext(config, path)
    finally:
        torch.set_num_threads(threads)
    folder = Path(out) if out is not None else wikitext_cache_dir()
    metrics = {**result.metrics, "curve": result.log.curve}
    return save_checkpoint(folder, result.model, result.tokenizer, metrics=metrics, card=wikitext_card(result))


def heldout_windows(
    tokenizer: Any, config: WikiTextConfig = WikiTextConfig(), path: str | Path | None = None
) -> Tensor:
    """The held-out ``<bos>``-prefixed windows of ``config.n_ctx`` tokens, for evaluation and studies."""
    corpus = load_wikitext(config, path)
    return windows(encode_articles(tokenizer, corpus.heldout_articles), config.n_ctx)
