"""Shared machinery of the project-trained subjects: word-level tokenizers, GPT-2 configs, a
seeded training loop and the checkpoint-folder writer."""

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tl_tensorlens.subjects.induction import InductionConfig
    from tl_tensorlens.subjects.relation_model import RelationConfig
    from tl_tensorlens.subjects.wikitext import WikiTextConfig

    #: A subject's model size and training recipe (the fields the configs share).
    Recipe = InductionConfig | RelationConfig | WikiTextConfig

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")


def word_tokenizer(words: Sequence[str]) -> Any:
    """A word-level, whitespace-split ``PreTrainedTokenizerFast`` built locally (no training data
    needed: the vocabulary is the given word list after the four special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        if w not in vocab:
            vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1 << 30,
    )


def gpt2_model(config: "Recipe", *, d_vocab: int) -> Any:
    """A freshly initialised, dropout-free ``GPT2LMHeadModel`` of the recipe's size (seeded).

    ``n_ctx`` is written to the config as well as ``n_positions``: TransformerLens 3.9's GPT-2
    config converter reads ``hf_config.n_ctx``, which transformers 5 no longer sets by default.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_config = GPT2Config(
        vocab_size=d_vocab,
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        architectures=["GPT2LMHeadModel"],
    )
    gpt2_config.n_ctx = config.n_ctx  # not a declared GPT2Config field: saved to config.json as an extra key
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(gpt2_config)
    return model


@dataclass(frozen=True)
class TrainLog:
    """What a training run records: the curve (one row per evaluation) and the wall time."""

    curve: list[dict[str, float]]
    seconds: float


#: Linear warm-up steps of :func:`train_lm` (the model cards quote it).
WARMUP = 50


def train_lm(
    model: torch.nn.Module,
    config: "Recipe",
    batch_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    eval_fn: Callable[[], dict[str, float]],
) -> TrainLog:
    """Next-token training with AdamW, linear warm-up then cosine decay, for the recipe's steps.

    ``batch_fn(step)`` returns ``(tokens [batch, pos], loss_mask [batch, pos])``; the mask marks
    the positions whose *next* token is scored; ``eval_fn()`` runs every ``config.eval_every``
    steps and at the end. Deterministic given the model's initial weights and ``batch_fn``
    (single-threaded CPU).
    """
    steps, lr, eval_every, warmup = config.steps, config.lr, config.eval_every, WARMUP
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        model.train()
        tokens, mask = batch_fn(step)
        logits = model(tokens).logits[:, :-1]
        target = tokens[:, 1:]
        m = mask[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[m], target[m])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            n = (step % eval_every) + 1
            row = {"step": float(step + 1), "train_loss": running / n}
            with torch.no_grad():
                row.update(eval_fn())
            row["seconds"] = time.perf_counter() - start
            curve.append(row)
            running = 0.0
    model.eval()
    return TrainLog(curve=curve, seconds=time.perf_counter() - start)


def curve_table(curve: list[dict[str, float]]) -> str:
    """The training curve as a markdown table (floats to 4 digits, step as an integer)."""
    keys = [k for k in curve[0] if k != "seconds"] + ["seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in curve:
        cells = [str(int(row[k])) if k == "step" else f"{row[k]:.4g}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_section(config: "Recipe", log: TrainLog) -> str:
    """The model card's "Training" section: the recipe of :func:`train_lm` and its curve."""
    c = config
    return f"""## Training
AdamW (lr {c.lr}, weight decay {c.weight_decay}, betas (0.9, 0.98)), {WARMUP} warm-up steps then
cosine decay, {c.steps} steps of batch {c.batch_size}, gradient clip 1.0, seed {c.seed},
1 CPU thread: {log.seconds:.0f} s.

{curve_table(log.curve)}"""


def metrics_table(metrics: dict[str, float]) -> str:
    """The model card's final metrics as a markdown table (4 decimals; the wall time left out)."""
    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if k != "train_seconds"]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def save_checkpoint(
    out: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    metrics: dict[str, Any],
    card: str,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write a Hugging Face checkpoint folder: ``config.json``, ``model.safetensors``, tokenizer
    files, ``metrics.json``, a model card ``README.md`` and any extra JSON files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # generation_config.json carries nothing we use; drop it to keep the folder minimal.
    (out / "generation_config.json").unlink(missing_ok=True)
    _write_json(out / "metrics.json", metrics)
    for name, payload in (extra_json or {}).items():
        _write_json(out / name, payload)
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")


def logits_of(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, pos, d_vocab]`` from a HF causal LM or a TransformerLens model."""
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out
