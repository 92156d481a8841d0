"""A 2-layer GPT-2 trained to do induction, with known ground truth at every position.

Data: ``<bos> A_1 ... A_L A_1 ... A_L``, where ``A`` is a segment of ``L`` **distinct** random
tokens (distinct so that the earlier occurrence of every token is unique). In the second copy,
the token after ``A_i`` is ``A_{i+1}``, which sits at position ``i + 2`` of the first copy: the
answer is always "the token after the earlier occurrence of the current token". The first copy
is unpredictable (chance accuracy), so the model can only lower its loss by induction.

:func:`induction_batch` is the generator for demos and tests; :func:`train_induction` trains
the committed checkpoint (``scripts/train_induction.py``).
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.subjects._training import (
    SPECIAL_TOKENS,
    TrainLog,
    gpt2_model,
    logits_of,
    metrics_table,
    train_lm,
    training_section,
    word_tokenizer,
)

N_RANDOM_TOKENS = 96
BOS_ID = SPECIAL_TOKENS.index("<bos>")
FIRST_RANDOM_ID = len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class InductionBatch:
    """Repeated-segment sequences with the induction ground truth.

    Attributes:
        tokens: ``[batch, pos]``, ``<bos>`` then a segment of distinct tokens then its copy.
        is_repeat: ``[batch, pos]``, True where the current token lies in the second copy and
            the next token is part of it too: the positions whose prediction induction decides.
        targets: ``[batch, pos]``, the next token (the ground-truth answer at ``is_repeat``
            positions); ``-1`` at the last position.
        src_pos: ``[batch, pos]``, at ``is_repeat`` positions the position of the token after
            the earlier occurrence of the current token (where an induction head should attend);
            ``-1`` elsewhere.
    """

    tokens: Int[Tensor, "batch pos"]
    is_repeat: Bool[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    src_pos: Int[Tensor, "batch pos"]


def induction_batch(n: int, seq_len: int, seed: int, *, n_random_tokens: int = N_RANDOM_TOKENS) -> InductionBatch:
    """``n`` induction sequences of length ``seq_len`` (odd: ``<bos>`` + two copies).

    Args:
        n: batch size.
        seq_len: ``1 + 2 L`` for a segment length ``L`` (between 2 and ``n_random_tokens``).
        seed: seeds a private generator (the global RNG is untouched).
        n_random_tokens: size of the random-token alphabet (96 in the committed model, whose
            token ids start after the 4 special tokens).

    Returns:
        An :class:`InductionBatch`.

    Raises:
        TensorLensError: ``seq_len`` is even, too short, or needs more distinct tokens than exist.

    Example:
        >>> b = induction_batch(2, 9, seed=0)
        >>> b.tokens.shape, int(b.is_repeat.sum())
        (torch.Size([2, 9]), 6)
        >>> bool((b.tokens.gather(1, b.src_pos.clamp(min=0))[b.is_repeat] == b.targets[b.is_repeat]).all())
        True
    """
    seg = (seq_len - 1) // 2
    if seq_len % 2 == 0 or seg < 2 or seg > n_random_tokens:
        raise TensorLensError(
            f"seq_len must be odd, >= 5 and <= {2 * n_random_tokens + 1} "
            f"(<bos> + two copies of a segment of distinct tokens), got {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    # argsort of uniform noise = a random permutation per row: segments of distinct tokens.
    perm = torch.rand(n, n_random_tokens, generator=gen).argsort(dim=1)[:, :seg]
    segment = perm + FIRST_RANDOM_ID
    bos = torch.full((n, 1), BOS_ID, dtype=torch.long)
    tokens = torch.cat([bos, segment, segment], dim=1)
    pos = torch.arange(seq_len)
    # position p in the second copy (p in [seg+1, 2 seg - 1]) holds A_i with i = p - seg; the
    # token after its earlier occurrence (at position i) sits at position i + 1 = p - seg + 1.
    repeat = (pos >= seg + 1) & (pos <= 2 * seg - 1)
    is_repeat = repeat.expand(n, seq_len).clone()
    targets = torch.cat([tokens[:, 1:], torch.full((n, 1), -1, dtype=torch.long)], dim=1)
    src = torch.where(repeat, pos - seg + 1, torch.full_like(pos, -1))
    return InductionBatch(tokens, is_repeat, targets, src.expand(n, seq_len).clone())


def induction_tokenizer(n_random_tokens: int = N_RANDOM_TOKENS) -> Any:
    """The word-level tokenizer of the induction model: specials then ``t00`` ... ``t95``."""
    return word_tokenizer([f"t{i:02d}" for i in range(n_random_tokens)])


@dataclass(frozen=True)
class InductionConfig:
    """Model size and training recipe of the induction model (defaults = committed checkpoint)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 64
    n_random_tokens: int = N_RANDOM_TOKENS
    min_segment: int = 4
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0
    eval_seed: int = 10_000
    eval_every: int = 100
    eval_seq_lens: tuple[int, ...] = field(default=(11, 31, 63))
    eval_n: int = 256


@dataclass(frozen=True)
class InductionResult:
    """A trained induction model with its tokenizer, training log and final metrics."""

    model: Any
    tokenizer: Any
    config: InductionConfig
    log: TrainLog
    metrics: dict[str, float]


def evaluate_induction(
    model: Any, *, seq_len: int, n: int, seed: int, n_random_tokens: int = N_RANDOM_TOKENS
) -> dict[str, float]:
    """Accuracy and loss of ``model`` on held-out induction sequences.

    Works for a HF ``GPT2LMHeadModel`` and for TransformerLens models (anything whose call
    returns logits or an object with ``.logits``).

    Returns:
        ``repeat_acc`` (argmax = ground truth on ``is_repeat`` positions), ``repeat_loss``
        (mean cross-entropy there) and ``first_half_acc`` (the unpredictable first copy).
    """
    batch = induction_batch(n, seq_len, seed, n_random_tokens=n_random_tokens)
    with torch.no_grad():
        logits = logits_of(model, batch.tokens).double()
    m = batch.is_repeat
    pred = logits.argmax(-1)
    seg = (seq_len - 1) // 2
    first = torch.zeros_like(m)
    first[:, 1:seg] = True
    return {
        "repeat_acc": (pred[m] == batch.targets[m]).double().mean().item(),
        "repeat_loss": torch.nn.functional.cross_entropy(logits[m], batch.targets[m]).item(),
        "first_half_acc": (pred[first] == batch.targets[first]).double().mean().item(),
    }


def train_induction(config: InductionConfig = InductionConfig()) -> InductionResult:
    """Train the induction model (seeded, single-threaded CPU; ~1 min at the defaults).

    Each step draws a batch with a random segment length in ``[min_segment, (n_ctx - 1) // 2]``,
    so every position up to ``n_ctx`` is trained. Metrics are measured on sequences drawn from
    ``eval_seed`` (disjoint seeds from training).

    Example:
        >>> r = train_induction(InductionConfig(steps=20, d_model=16, eval_every=10,
        ...                                     eval_seq_lens=(11,), eval_n=8))
        >>> sorted(r.metrics)[:2]
        ['first_half_acc_11', 'repeat_acc_11']
    """
    model = gpt2_model(config, d_vocab=len(SPECIAL_TOKENS) + config.n_random_tokens)
    max_seg = (config.n_ctx - 1) // 2
    lengths = torch.Generator().manual_seed(config.seed + 1)

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seg = int(torch.randint(config.min_segment, max_seg + 1, (1,), generator=lengths))
        # Step-indexed seeds keep batches reproducible and far from the eval seeds.
        b = induction_batch(
            config.batch_size,
            2 * seg + 1,
            seed=config.seed * 1_000_003 + step + 1,
            n_random_tokens=config.n_random_tokens,
        )
        # Score only the second copy (where induction decides the answer): the first copy is
        # chance, and its loss only dilutes the gradient signal that forms the induction circuit.
        mask = torch.zeros_like(b.tokens, dtype=torch.bool)
        mask[:, seg:] = True
        return b.tokens, mask

    main_len = max(config.eval_seq_lens)

    def eval_fn() -> dict[str, float]:
        r = evaluate_induction(
            model,
            seq_len=main_len,
            n=min(config.eval_n, 128),
            seed=config.eval_seed,
            n_random_tokens=config.n_random_tokens,
        )
        return {"eval_repeat_acc": r["repeat_acc"], "eval_repeat_loss": r["repeat_loss"]}

    log = train_lm(model, config, batch_fn, eval_fn)
    metrics: dict[str, float] = {}
    for seq_len in config.eval_seq_lens:
        r = evaluate_induction(
            model,
            seq_len=seq_len,
            n=config.eval_n,
            seed=config.eval_seed + seq_len,
            n_random_tokens=config.n_random_tokens,
        )
        metrics.update({f"{k}_{seq_len}": v for k, v in r.items()})
    metrics["train_seconds"] = log.seconds
    return InductionResult(model, induction_tokenizer(config.n_random_tokens), config, log, metrics)


def induction_card(result: InductionResult) -> str:
    """The model card (markdown) of a trained induction model."""
    c = result.config
    n_params = sum(p.numel() for p in result.model.parameters())
    return f"""# tl_tensorlens induction subject

A {c.n_layers}-layer `GPT2LMHeadModel` (d_model {c.d_model}, {c.n_heads} heads, MLPs, learned
positions, n_ctx {c.n_ctx}, vocab {len(SPECIAL_TOKENS) + c.n_random_tokens}, {n_params:,} parameters,
tied embeddings) trained by `scripts/train_induction.py` in plain PyTorch.

## Data and ground truth
Sequences `<bos> A_1 .. A_L A_1 .. A_L` with `A` a segment of `L` distinct tokens drawn uniformly
from `t00`..`t{c.n_random_tokens - 1:02d}` (`tl_tensorlens.subjects.induction_batch`). At the second occurrence of
`A_i` the answer is `A_(i+1)`, the token after the first occurrence (`InductionBatch.src_pos`).
Training draws `L` uniformly in [{c.min_segment}, {(c.n_ctx - 1) // 2}] per batch; evaluation uses other seeds.

{training_section(c, result.log)}

`eval_*` = held-out sequences of length {max(c.eval_seq_lens)}.

## Final metrics (held-out, {c.eval_n} sequences per length)
`repeat_acc_N`: top-1 accuracy on the repeated half of length-N sequences (the ground-truth
positions); `first_half_acc_N`: the unpredictable first copy (chance is about 1/{c.n_random_tokens}).

{metrics_table(result.metrics)}

Config: `{asdict(c)}`
"""
