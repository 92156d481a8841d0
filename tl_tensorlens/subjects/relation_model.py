"""A small GPT-2 that memorises invented facts, so relation decoding has known ground truth.

Every invented entity (``Bora``, ``Kilan``, ...) has one object per relation (``lives in`` a city,
``works as a`` job, ``speaks`` a language, ``plays the`` instrument, ``owns a`` pet), drawn at
random from a seeded generator. The model is trained on sequences of templated statements, half
of them few-shot blocks (``A lives in X . B lives in Y . C lives in Z .``) so that few-shot
prompts, the format relation-decoding methods use, are in-distribution.

Templates are compositional: a relation phrase behind a modifier (``""``, ``"everyone knows
that"``, ``"it is true that"``, ``"we heard that"``). Each relation keeps one modifier out of
training (a different one per relation, each modifier being trained with other relations): these
**held-out templates** use only known words in unseen combinations.

The facts and relation definitions are exported in the LRE JSON layout (Hernandez et al. 2024:
``name``, ``prompt_templates``, ``prompt_templates_zs``, ``properties``, ``samples``) by
:func:`relation_specs`; the committed checkpoint holds them under ``relations/``.
"""

import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

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

# Invented, one-word names: single tokens under the word-level tokenizer.
# fmt: off
ENTITIES: tuple[str, ...] = (
    "Abo", "Bixa", "Cadu", "Delo", "Efra", "Fiko", "Gavu", "Hesa", "Ilor", "Jatu", "Kemi", "Lusa",
    "Mavo", "Nerit", "Odra", "Pelu", "Quon", "Rasi", "Soto", "Tavi", "Ulme", "Vero", "Wisa", "Xalo",
    "Yeti", "Zuma", "Arvo", "Beku", "Cira", "Dano", "Elki", "Fosa", "Gilo", "Hamu", "Iska", "Joru",
    "Kato", "Lemi", "Mori", "Nalu", "Orsa", "Pimo", "Ruda", "Sela", "Tomu", "Vada", "Wepo", "Zira",
)
# fmt: on

# name -> (relation phrase, range name, objects). The phrase is what follows the subject.
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "person lives in city": (
        "lives in",
        "city",
        ("Oslo", "Lima", "Cairo", "Quito", "Dakar", "Hanoi", "Perth", "Riga"),
    ),
    "person occupation": (
        "works as a",
        "occupation",
        ("baker", "pilot", "nurse", "farmer", "lawyer", "dentist", "sailor", "painter"),
    ),
    "person language": (
        "speaks",
        "language",
        ("Finnish", "Swahili", "Tagalog", "Basque", "Welsh", "Quechua", "Maltese", "Icelandic"),
    ),
    "person instrument": (
        "plays the",
        "instrument",
        ("violin", "drums", "flute", "harp", "cello", "banjo", "trumpet", "piano"),
    ),
    "person pet": (
        "owns a",
        "animal",
        ("parrot", "ferret", "tortoise", "goat", "hamster", "lizard", "rabbit", "pony"),
    ),
}

MODIFIERS: tuple[str, ...] = ("", "everyone knows that", "it is true that", "we heard that")
SEPARATOR = "."


def _template(modifier: str, phrase: str) -> str:
    return f"{modifier} {{}} {phrase}".strip()


def templates(relation_index: int) -> tuple[list[str], list[str]]:
    """(training templates, held-out templates) of a relation, ``{}`` standing for the subject.

    Relation ``k`` holds out modifier ``1 + k % 3``; the bare template is always trained.

    Example:
        >>> templates(0)
        (['{} lives in', 'it is true that {} lives in', 'we heard that {} lives in'], ['everyone knows that {} lives in'])
    """
    phrase = list(RELATIONS.values())[relation_index][0]
    held = 1 + relation_index % (len(MODIFIERS) - 1)
    train = [_template(m, phrase) for i, m in enumerate(MODIFIERS) if i != held]
    return train, [_template(MODIFIERS[held], phrase)]


@dataclass(frozen=True)
class Fact:
    """One ground-truth fact: ``subject`` stands in relation ``relation`` to ``object``."""

    relation: str
    subject: str
    object: str


def make_facts(seed: int = 0, n_entities: int = len(ENTITIES)) -> list[Fact]:
    """The ground-truth facts: each of the first ``n_entities`` entities gets one uniformly drawn
    object per relation (``random.Random(seed)``, independent of torch)."""
    if not 2 <= n_entities <= len(ENTITIES):
        raise TensorLensError(f"n_entities must be in [2, {len(ENTITIES)}], got {n_entities}")
    rng = random.Random(seed)
    return [
        Fact(name, entity, rng.choice(objects))
        for name, (_, _, objects) in RELATIONS.items()
        for entity in ENTITIES[:n_entities]
    ]


def relation_specs(facts: list[Fact]) -> list[dict[str, Any]]:
    """Relation definitions and facts in the LRE JSON layout (one dict per relation).

    Keys: ``name``, ``prompt_templates`` (training templates), ``prompt_templates_zs`` (the bare
    template), ``prompt_templates_heldout`` (not in LRE: templates never trained on),
    ``properties`` (``relation_type``, ``domain_name``, ``range_name``, ``symmetric``),
    ``samples`` (``[{"subject", "object"}]``) and ``few_shot_separator`` (joins demonstrations).

    Example:
        >>> spec = relation_specs(make_facts(0))[0]
        >>> spec["name"], spec["prompt_templates_zs"], len(spec["samples"])
        ('person lives in city', ['{} lives in'], 48)
    """
    specs = []
    for k, (name, (_, range_name, _)) in enumerate(RELATIONS.items()):
        train, held = templates(k)
        specs.append(
            {
                "name": name,
                "prompt_templates": train,
                "prompt_templates_zs": [train[0]],
                "prompt_templates_heldout": held,
                "properties": {
                    "relation_type": "synthetic",
                    "domain_name": "person",
                    "range_name": range_name,
                    "symmetric": False,
                },
                "few_shot_separator": f" {SEPARATOR} ",
                "samples": [{"subject": f.subject, "object": f.object} for f in facts if f.relation == name],
            }
        )
    return specs


def relation_tokenizer() -> Any:
    """Word-level tokenizer over entities, objects and template words."""
    words: list[str] = [SEPARATOR, *ENTITIES]
    for phrase, _, objects in RELATIONS.values():
        words += phrase.split() + list(objects)
    for m in MODIFIERS:
        words += m.split()
    return word_tokenizer(list(dict.fromkeys(words)))


def few_shot_prompt(template: str, demos: list[tuple[str, str]], subject: str) -> str:
    """``"A lives in X . B lives in Y . C lives in"`` (demos then the query, no object).

    Example:
        >>> few_shot_prompt("{} lives in", [("Abo", "Oslo")], "Bixa")
        'Abo lives in Oslo . Bixa lives in'
    """
    parts = [f"{template.format(s)} {o} {SEPARATOR}" for s, o in demos]
    return " ".join([*parts, template.format(subject)])


@dataclass(frozen=True)
class RelationConfig:
    """Model size, data and training recipe of the relation model (defaults = committed)."""

    n_layers: int = 4
    d_model: int = 96
    n_heads: int = 4
    n_ctx: int = 96
    n_entities: int = len(ENTITIES)
    fact_seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    few_shot_fraction: float = 0.5
    max_shots: int = 4
    seed: int = 0
    eval_every: int = 200
    eval_seed: int = 10_000


def _statement_tokens(vocab: dict[str, int], template: str, subject: str, obj: str) -> list[int]:
    """Token ids of ``template(subject) obj .`` (a vocabulary lookup: calling the tokenizer per
    statement dominated the step time)."""
    return [vocab[w] for w in f"{template.format(subject)} {obj} {SEPARATOR}".split()]


def _training_sequence(
    rng: random.Random, vocab: dict[str, int], facts: list[Fact], config: RelationConfig
) -> tuple[list[int], list[int]]:
    """One packed training sequence and the positions whose next token is scored."""
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    names = list(RELATIONS)
    ids = [SPECIAL_TOKENS.index("<bos>")]
    scored: list[int] = []
    while len(ids) < config.n_ctx:
        if rng.random() < config.few_shot_fraction:
            # A few-shot block: one relation, one training template, distinct subjects.
            k = rng.randrange(len(names))
            template = rng.choice(templates(k)[0])
            block = rng.sample(by_rel[names[k]], rng.randint(2, config.max_shots + 1))
        else:
            block = []
            for _ in range(rng.randint(1, 3)):
                k = rng.randrange(len(names))
                block.append(rng.choice(by_rel[names[k]]))
            template = ""
        for f in block:
            k = names.index(f.relation)
            t = template or rng.choice(templates(k)[0])
            st = _statement_tokens(vocab, t, f.subject, f.object)
            subj_idx = t.split().index("{}")
            start = len(ids)
            ids += st
            # Score everything but the subject (a random draw, only noise to the loss).
            scored += [start + i - 1 for i in range(len(st)) if i != subj_idx]
    ids = ids[: config.n_ctx]
    return ids, [p for p in scored if 0 <= p < config.n_ctx - 1]


def evaluate_relations(
    model: Any,
    tokenizer: Any,
    facts: list[Fact],
    *,
    shots: int,
    heldout: bool,
    seed: int,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of ``model`` at recalling every fact (object token after the prompt).

    Args:
        model: HF causal LM or TransformerLens model.
        tokenizer: the relation tokenizer.
        facts: the facts to test.
        shots: number of few-shot demonstrations (other subjects, same relation and template).
        heldout: use the held-out templates instead of the training ones.
        seed: seeds the choice of demonstrations.
        batch_size: prompts per forward pass (same-length prompts are batched together).

    Returns:
        The fraction of (fact, template) prompts whose argmax next token is the true object.
    """
    rng = random.Random(seed)
    names = list(RELATIONS)
    prompts: list[tuple[list[int], int]] = []
    for f in facts:
        k = names.index(f.relation)
        pool = [g for g in facts if g.relation == f.relation and g.subject != f.subject]
        for template in templates(k)[1 if heldout else 0]:
            demos = [(g.subject, g.object) for g in rng.sample(pool, shots)]
            text = few_shot_prompt(template, demos, f.subject)
            ids = [SPECIAL_TOKENS.index("<bos>"), *tokenizer.encode(text, add_special_tokens=False)]
            prompts.append((ids, tokenizer.convert_tokens_to_ids(f.object)))
    cfg = getattr(model, "cfg", None)
    n_ctx = cfg.n_ctx if cfg is not None else model.config.n_positions
    longest = max(len(ids) for ids, _ in prompts)
    if longest > n_ctx:
        raise TensorLensError(f"a {shots}-shot prompt has {longest} tokens, more than the model's n_ctx {n_ctx}")
    correct = 0
    by_len: dict[int, list[tuple[list[int], int]]] = {}
    for p in prompts:
        by_len.setdefault(len(p[0]), []).append(p)
    with torch.no_grad():
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                tokens = torch.tensor([ids for ids, _ in chunk])
                pred = logits_of(model, tokens)[:, -1].argmax(-1)
                correct += int((pred == torch.tensor([o for _, o in chunk])).sum())
    return correct / len(prompts)


@dataclass(frozen=True)
class RelationResult:
    """A trained relation model with its tokenizer, facts, training log and final metrics."""

    model: Any
    tokenizer: Any
    config: RelationConfig
    facts: list[Fact]
    log: TrainLog
    metrics: dict[str, float]


def train_relations(config: RelationConfig = RelationConfig()) -> RelationResult:
    """Train the relation model (seeded, single-threaded CPU; a few minutes at the defaults).

    Example:
        >>> r = train_relations(RelationConfig(steps=4, n_layers=1, d_model=16, n_entities=6,
        ...                                    eval_every=2))
        >>> 0.0 <= r.metrics["recall_fewshot_3"] <= 1.0
        True
    """
    tok = relation_tokenizer()
    facts = make_facts(config.fact_seed, config.n_entities)
    model = gpt2_model(config, d_vocab=len(tok))
    rng = random.Random(config.seed)
    vocab = tok.get_vocab()
    pad = SPECIAL_TOKENS.index("<pad>")

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.full((config.batch_size, config.n_ctx), pad, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for b in range(config.batch_size):
            ids, scored = _training_sequence(rng, vocab, facts, config)
            tokens[b, : len(ids)] = torch.tensor(ids)
            mask[b, scored] = True
        return tokens, mask

    def eval_fn() -> dict[str, float]:
        return {
            "recall_fewshot_3": evaluate_relations(model, tok, facts, shots=3, heldout=False, seed=config.eval_seed),
            "heldout_fewshot_3": evaluate_relations(model, tok, facts, shots=3, heldout=True, seed=config.eval_seed),
        }

    log = train_lm(model, config, batch_fn, eval_fn)
    metrics: dict[str, float] = {}
    for shots in (0, 1, 3):
        for heldout in (False, True):
            key = f"{'heldout' if heldout else 'recall'}_fewshot_{shots}"
            metrics[key] = evaluate_relations(
                model, tok, facts, shots=shots, heldout=heldout, seed=config.eval_seed + shots
            )
    metrics["train_seconds"] = log.seconds
    return RelationResult(model, tok, config, facts, log, metrics)


def relation_card(result: RelationResult) -> str:
    """The model card (markdown) of a trained relation model."""
    c = result.config
    n_params = sum(p.numel() for p in result.model.parameters())
    rel_rows = "\n".join(
        f"| {name} | `{templates(k)[0]}` | `{templates(k)[1]}` | {', '.join(objs)} |"
        for k, (name, (_, _, objs)) in enumerate(RELATIONS.items())
    )
    return f"""# tl_tensorlens relation subject

A {c.n_layers}-layer `GPT2LMHeadModel` (d_model {c.d_model}, {c.n_heads} heads, MLPs, n_ctx {c.n_ctx},
word-level vocab of {len(result.tokenizer)}, {n_params:,} parameters, tied embeddings) that memorises
{len(result.facts)} invented facts: {c.n_entities} invented one-token entities x {len(RELATIONS)} relations,
objects drawn uniformly (seed {c.fact_seed}). Trained by `scripts/train_relations.py` in plain PyTorch.

## Relations and templates (`{{}}` = subject)
| relation | training templates | held-out templates | objects |
|---|---|---|---|
{rel_rows}

The ground truth is in `relations/*.json` (LRE layout: `name`, `prompt_templates`,
`prompt_templates_zs`, `prompt_templates_heldout`, `properties`, `samples`).

## Data
Packed sequences of {c.n_ctx} tokens starting with `<bos>`: with probability {c.few_shot_fraction} a few-shot
block (2 to {c.max_shots + 1} statements of one relation with one training template, `S phrase O .`), otherwise
1 to 3 statements with random relations and training templates. The loss scores every next token
except the subjects (random draws).

{training_section(c, result.log)}

## Final metrics
`recall_fewshot_k`: top-1 accuracy of the object after a prompt with k demonstrations (other
subjects, same relation and template) over every fact and every training template;
`heldout_fewshot_k`: the same with the held-out templates.

{metrics_table(result.metrics)}

Config: `{asdict(c)}`
"""
