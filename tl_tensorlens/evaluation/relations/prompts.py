"""Few-shot relation prompts whose token positions line up, so per-prompt tensors can be averaged.

Alignment (why the mean tensor's shapes agree). The mean tensor of Eq. 26 averages slices
``T_k[-1] ∈ R^{d_out × pos × d_model}`` over training prompts and applies the average to a held-out
prompt, so every prompt of a split must have the same length and the same role at every
position. Prompts are therefore assembled from separately tokenized pieces,

    [BOS] + demo_1 + ... + demo_m + query,    demo_i = tokens("<template(s_i)> <o_i>" + separator),
                                              query  = tokens("<template(s)>"),

which fixes every piece's span by construction (no BPE merge across a piece boundary). Samples are
then filtered to the most common *alignment key*: the query length and the subject's last-token
index inside the query (so the subject sits at the same absolute position in every prompt), and,
when the few-shot demos differ between prompts (``few_shot="leave_one_out"``), also the demo
length. Two few-shot schemes are offered:

* ``"leave_one_out"`` (the paper / LRE): training prompt k is preceded by the other n−1 training
  examples; a test prompt by the first n−1 training examples. All demos must share one length.
* ``"shared"``: one fixed context of ``n_shots`` extra examples (disjoint from train and test)
  precedes every prompt of the split, so only the query needs to be aligned; fewer samples are
  dropped, at the cost of ``n_shots`` samples per split.
"""

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_tensorlens.errors import PromptAlignmentError
from tl_tensorlens.evaluation.relations.data import Relation, RelationSample

__all__ = [
    "AlignedSample",
    "FewShot",
    "PromptAlignmentError",
    "PromptFormat",
    "PromptTokenizer",
    "RelationPrompt",
    "WordTokenizer",
    "align_sample",
    "align_samples",
    "build_prompt",
    "most_common_length",
    "stack_tokens",
]

FewShot = Literal["leave_one_out", "shared"]


@dataclass(frozen=True)
class PromptTokenizer:
    """What prompt building needs from a tokenizer: text → ids without special tokens, and a BOS.

    Attributes:
        encode: Text → token ids, with no special tokens added.
        bos_token_id: Prepended to every prompt when not ``None``.
        decode: Ids → text (only for display).

    Example:
        >>> tok = PromptTokenizer(encode=lambda s: [len(w) for w in s.split()], bos_token_id=0)
        >>> tok.encode("ab c")
        [2, 1]
    """

    encode: Callable[[str], list[int]]
    bos_token_id: int | None = None
    decode: Callable[[Sequence[int]], str] | None = None

    @classmethod
    def from_hf(cls, tokenizer: Any, *, prepend_bos: bool = True) -> "PromptTokenizer":
        """Adapt a Hugging Face tokenizer (``add_special_tokens=False``; BOS added by the prompt).

        Args:
            tokenizer: A ``transformers`` tokenizer.
            prepend_bos: Prepend ``tokenizer.bos_token_id`` (if the tokenizer has one).
        """
        bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
        return cls(
            encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
            bos_token_id=None if bos is None else int(bos),
            decode=lambda ids: str(tokenizer.decode(list(ids))),
        )

    @classmethod
    def from_model(cls, model: Any) -> "PromptTokenizer":
        """Use ``model.tokenizer``, prepending BOS as ``model.cfg.default_prepend_bos`` says.

        Raises:
            PromptAlignmentError: The model has no tokenizer (pass a :class:`PromptTokenizer`).
        """
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise PromptAlignmentError(
                "model.tokenizer is None: pass tokenizer=PromptTokenizer(...) or WordTokenizer(...)"
            )
        if isinstance(tokenizer, PromptTokenizer):
            return tokenizer
        prepend = bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))
        return cls.from_hf(tokenizer, prepend_bos=prepend)


_WORD = re.compile(r"\n|[\w'.-]+|[^\w\s]")


@dataclass(frozen=True)
class WordTokenizer:
    """A made-up word-level tokenizer for random-init models (smoke tests, doctests).

    Words, punctuation and newlines become tokens; ids come from a vocabulary built from the
    relations, folded into ``[1, d_vocab)`` (collisions are harmless for a smoke test); id 0 is BOS.

    Example:
        >>> tok = WordTokenizer.from_texts(["The capital of France is Paris"], d_vocab=50)
        >>> ids = tok.encode("The capital of France is")
        >>> len(ids), tok.bos_token_id
        (5, 0)
    """

    vocab: dict[str, int] = field(default_factory=dict)
    d_vocab: int = 50
    bos_token_id: int | None = 0

    @classmethod
    def from_texts(cls, texts: Iterable[str], d_vocab: int) -> "WordTokenizer":
        """Vocabulary from ``texts`` (sorted, so it is deterministic)."""
        words = sorted({w for text in texts for w in _WORD.findall(text)})
        return cls({w: 1 + i % (d_vocab - 1) for i, w in enumerate(words)}, d_vocab)

    @classmethod
    def from_relations(cls, relations: Iterable[Relation], d_vocab: int) -> "WordTokenizer":
        """Vocabulary from every template, subject and object of ``relations``."""
        texts: list[str] = []
        for r in relations:
            texts += list(r.prompt_templates) + [t for s in r.samples for t in (s.subject, s.object)]
        return cls.from_texts(texts + ["\n"], d_vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the words of ``text``; unknown words hash into the vocabulary range."""
        return [self.vocab.get(w, 1 + sum(ord(c) for c in w) % (self.d_vocab - 1)) for w in _WORD.findall(text)]

    def as_prompt_tokenizer(self) -> PromptTokenizer:
        """This tokenizer as a :class:`PromptTokenizer`."""
        inverse = {v: k for k, v in self.vocab.items()}
        return PromptTokenizer(
            self.encode, self.bos_token_id, lambda ids: " ".join(inverse.get(int(i), "?") for i in ids)
        )


def _as_prompt_tokenizer(tokenizer: "PromptTokenizer | WordTokenizer") -> PromptTokenizer:
    return tokenizer.as_prompt_tokenizer() if isinstance(tokenizer, WordTokenizer) else tokenizer


@dataclass(frozen=True)
class PromptFormat:
    """How a demo line and the query are written.

    Attributes:
        demo: Demo line; ``{query}`` is the filled template, ``{object}`` the object.
        separator: Appended to every demo line; ``None`` uses the relation's own
            ``few_shot_separator`` if it has one, else a newline (LRE's choice).
        object_prefix: Prepended to the object when finding its first token (``" "`` for BPE
            vocabularies where ``" Paris"`` and ``"Paris"`` differ, as in LRE).

    Example:
        >>> PromptFormat().demo_text("The capital of {} is", RelationSample("France", "Paris"))
        'The capital of France is Paris\\n'
    """

    demo: str = "{query} {object}"
    separator: str | None = None
    object_prefix: str = " "

    def for_relation(self, relation: Relation) -> "PromptFormat":
        """This format with ``separator`` resolved for ``relation``."""
        if self.separator is not None:
            return self
        return replace(self, separator=relation.few_shot_separator or "\n")

    def query_text(self, template: str, subject: str) -> str:
        """The template with the subject filled in (``replace``, so braces in subjects are safe)."""
        return template.replace("{}", subject, 1)

    def demo_text(self, template: str, sample: RelationSample) -> str:
        """One few-shot demonstration line, separator included."""
        separator = "\n" if self.separator is None else self.separator
        return self.demo.format(query=self.query_text(template, sample.subject), object=sample.object) + separator


@dataclass(frozen=True)
class AlignedSample:
    """A sample tokenized piece by piece.

    Attributes:
        sample: The fact.
        query: Token ids of the filled template.
        subject_index: Index (inside ``query``) of the subject's last token.
        demo: Token ids of the sample written as a demo line.
        object_token: First token of the object (what the model should predict).
    """

    sample: RelationSample
    query: tuple[int, ...]
    subject_index: int
    demo: tuple[int, ...]
    object_token: int

    @property
    def key(self) -> tuple[int, int]:
        """Alignment key: (query length, subject's last-token index in the query)."""
        return (len(self.query), self.subject_index)


@dataclass(frozen=True)
class RelationPrompt:
    """One aligned prompt: ``[BOS] + demos + query``.

    Attributes:
        sample: The query fact.
        tokens: All token ids.
        subject_pos: Absolute position of the subject's last token.
        object_token: First token of the true object.
        demos: The few-shot samples in the prefix, in order.
    """

    sample: RelationSample
    tokens: tuple[int, ...]
    subject_pos: int
    object_token: int
    demos: tuple[RelationSample, ...]

    @property
    def n_pos(self) -> int:
        """Number of tokens."""
        return len(self.tokens)


def align_sample(
    tokenizer: "PromptTokenizer | WordTokenizer", template: str, sample: RelationSample, fmt: PromptFormat
) -> AlignedSample:
    """Tokenize one sample as query and demo, locating the subject's last token.

    Raises:
        PromptAlignmentError: The subject's tokens are not a prefix-consistent part of the query
            (a BPE merge across the subject's end), or the object is empty after tokenizing.
    """
    tok = _as_prompt_tokenizer(tokenizer)
    before = template.split("{}", 1)[0]
    query = tok.encode(fmt.query_text(template, sample.subject))
    head = tok.encode(before + sample.subject)
    # The subject's last token is only well defined if tokenizing "<before><subject>" gives a
    # prefix of the whole query; otherwise the tokenizer merged the subject with what follows.
    if not head or query[: len(head)] != head:
        raise PromptAlignmentError(
            f"subject {sample.subject!r} is merged with the template's next token in {template!r}"
        )
    obj = tok.encode(fmt.object_prefix + sample.object)
    if not obj:
        raise PromptAlignmentError(f"object {sample.object!r} tokenizes to nothing")
    return AlignedSample(
        sample, tuple(query), len(head) - 1, tuple(tok.encode(fmt.demo_text(template, sample))), obj[0]
    )


def most_common_length(values: Iterable[Any]) -> Any:
    """The most common value; ties go to the smallest, so the choice is deterministic.

    Example:
        >>> most_common_length([(5, 3), (6, 4), (5, 3), (6, 4), (7, 5)])
        (5, 3)
    """
    counts = Counter(values)
    if not counts:
        raise PromptAlignmentError("no values to take the most common length of")
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def align_samples(
    relation: Relation,
    tokenizer: "PromptTokenizer | WordTokenizer",
    *,
    template_index: int = 0,
    fmt: PromptFormat = PromptFormat(),
    few_shot: FewShot = "leave_one_out",
) -> tuple[AlignedSample, ...]:
    """Tokenize a relation's samples and keep those of the most common token length.

    Samples whose subject cannot be located are dropped first. The survivors are filtered to the
    most common :attr:`AlignedSample.key`; with ``few_shot="leave_one_out"`` they are further
    filtered to the most common demo length (demos then fill the same slots in every prompt).
    Repeated subjects are dropped (first kept) so a split never shows a test subject in a demo.

    Args:
        relation: The relation.
        tokenizer: Tokenizer adapter.
        template_index: Which of ``relation.prompt_templates`` to use.
        fmt: Prompt format.
        few_shot: Few-shot scheme (see the module docstring).

    Returns:
        The aligned samples, in the relation's order (possibly empty).

    Example:
        >>> from tl_tensorlens.evaluation.relations import Relation, RelationSample, WordTokenizer
        >>> r = Relation("r", ("{} is in",), (), (RelationSample("Paris", "France"),
        ...     RelationSample("New York", "USA"), RelationSample("Rome", "Italy")))
        >>> tok = WordTokenizer.from_relations([r], d_vocab=50)
        >>> [a.sample.subject for a in align_samples(r, tok)]
        ['Paris', 'Rome']
    """
    if not 0 <= template_index < len(relation.prompt_templates):
        raise PromptAlignmentError(
            f"template_index {template_index} out of range for {len(relation.prompt_templates)} template(s)"
        )
    template = relation.prompt_templates[template_index]
    fmt = fmt.for_relation(relation)
    aligned = []
    for sample in relation.unique_samples().samples:
        try:
            aligned.append(align_sample(tokenizer, template, sample, fmt))
        except PromptAlignmentError:
            continue
    if not aligned:
        return ()
    key = most_common_length(a.key for a in aligned)
    aligned = [a for a in aligned if a.key == key]
    if few_shot == "leave_one_out":
        demo_len = most_common_length(len(a.demo) for a in aligned)
        aligned = [a for a in aligned if len(a.demo) == demo_len]
    return tuple(aligned)


def build_prompt(
    query: AlignedSample, demos: Sequence[AlignedSample], tokenizer: "PromptTokenizer | WordTokenizer"
) -> RelationPrompt:
    """Assemble ``[BOS] + demos + query`` from pre-tokenized pieces.

    Example:
        >>> from tl_tensorlens.evaluation.relations import Relation, RelationSample, WordTokenizer
        >>> r = Relation("r", ("{} is in",), (), (RelationSample("Paris", "France"), RelationSample("Rome", "Italy")))
        >>> tok = WordTokenizer.from_relations([r], d_vocab=50)
        >>> a, b = align_samples(r, tok)
        >>> p = build_prompt(b, [a], tok)
        >>> p.n_pos, p.subject_pos   # BOS + "Paris is in France \\n" (5) + "Rome is in" (3)
        (9, 6)
    """
    tok = _as_prompt_tokenizer(tokenizer)
    prefix = [] if tok.bos_token_id is None else [tok.bos_token_id]
    for demo in demos:
        prefix += demo.demo
    return RelationPrompt(
        sample=query.sample,
        tokens=tuple(prefix) + query.query,
        subject_pos=len(prefix) + query.subject_index,
        object_token=query.object_token,
        demos=tuple(d.sample for d in demos),
    )


def stack_tokens(prompts: Sequence[RelationPrompt]) -> Int[Tensor, "batch pos"]:
    """Stack aligned prompts into one ``[batch, pos]`` tensor.

    Raises:
        PromptAlignmentError: The prompts differ in length or subject position.
    """
    if not prompts:
        raise PromptAlignmentError("no prompts to stack")
    shapes = {(p.n_pos, p.subject_pos) for p in prompts}
    if len(shapes) != 1:
        raise PromptAlignmentError(f"prompts are not aligned: (n_pos, subject_pos) values {sorted(shapes)}")
    return torch.tensor([p.tokens for p in prompts], dtype=torch.long)
