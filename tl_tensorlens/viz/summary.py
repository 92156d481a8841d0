"""A ``test_prompt``-style summary of what a decoder predicts: top-k tokens with probabilities, and
the rank of a given answer (like TransformerLens' ``utils.test_prompt``, returned as data).

No plotting library is needed; :func:`tl_tensorlens.viz.report.explain` puts the summary into the
report (``explain --answer " Paris"``).
"""

import html
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tl_tensorlens._backend import has_unembedding
from tl_tensorlens._checks import as_int, as_position
from tl_tensorlens.capture import FrozenState, as_prompt_tokens
from tl_tensorlens.errors import ArgumentError, UnsupportedModelError


def _decode(model: Any, token_id: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return f"#{token_id}" if tok is None else tok.decode([token_id])


@dataclass(frozen=True)
class AnswerRank:
    """One answer token's standing at the position that predicts it.

    Attributes:
        token: the answer token as text.
        token_id: its id.
        position: the position whose prediction is read (the one before the token).
        rank: 0 for the top prediction.
        prob: its probability there.
        logit: its logit there.
    """

    token: str
    token_id: int
    position: int
    rank: int
    prob: float
    logit: float


@dataclass(frozen=True)
class PredictionSummary:
    """Top-k next-token predictions at one position and, optionally, the answer's ranks.

    Attributes:
        position: the position read.
        top_tokens: the ``k`` most likely next tokens (text), most likely first.
        top_ids: their ids.
        top_probs: their probabilities.
        top_logits: their logits.
        answer: the answer string, or None.
        answer_ranks: per answer token (multi-token answers: each read after the previous ones,
            teacher-forced), its rank, probability and logit.
    """

    position: int
    top_tokens: tuple[str, ...]
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]
    top_logits: tuple[float, ...]
    answer: str | None = None
    answer_ranks: tuple[AnswerRank, ...] = ()

    def format(self) -> str:
        """Plain text in the style of TL's ``test_prompt``."""
        lines = []
        if self.answer is not None:
            lines.append(f"Answer: {self.answer!r}")
            for r in self.answer_ranks:
                lines.append(f"  rank {r.rank}  logit {r.logit:.2f}  prob {100 * r.prob:.2f}%  token {r.token!r}")
        lines.append(f"Top {len(self.top_tokens)} at position {self.position}:")
        for k, (t, p, lg) in enumerate(zip(self.top_tokens, self.top_probs, self.top_logits, strict=True)):
            lines.append(f"  top {k}: logit {lg:.2f}  prob {100 * p:.2f}%  token {t!r}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "position": self.position,
            "top": [
                {"token": t, "id": i, "prob": p, "logit": lg}
                for t, i, p, lg in zip(self.top_tokens, self.top_ids, self.top_probs, self.top_logits, strict=True)
            ],
            "answer": self.answer,
            "answer_ranks": [r.__dict__ for r in self.answer_ranks],
        }

    def to_html(self) -> str:
        """An HTML table (for the report)."""
        rows = "".join(
            f"<tr><td>{k}</td><td><code>{html.escape(repr(t))}</code></td><td>{100 * p:.2f}%</td><td>{lg:.2f}</td></tr>"
            for k, (t, p, lg) in enumerate(zip(self.top_tokens, self.top_probs, self.top_logits, strict=True))
        )
        out = [
            f"<h2>Top predictions</h2><p class='note'>position {self.position}; rank, token, probability, logit</p>"
            f"<table class='summary'><tr><th>rank</th><th>token</th><th>prob</th><th>logit</th></tr>{rows}</table>"
        ]
        if self.answer is not None:
            ranks = "; ".join(
                f"<code>{html.escape(repr(r.token))}</code> rank {r.rank} ({100 * r.prob:.2f}%, logit {r.logit:.2f})"
                for r in self.answer_ranks
            )
            out.append(f"<p>Answer <code>{html.escape(repr(self.answer))}</code>: {ranks}</p>")
        return "".join(out)


def prediction_summary(
    model: Any,
    prompt: Any,
    *,
    position: int = -1,
    k: int = 10,
    answer: str | None = None,
) -> PredictionSummary:
    """Top-``k`` next-token predictions with probabilities, and the rank of ``answer``.

    Args:
        model: a decoder (HookedTransformer or TransformerBridge).
        prompt: a string, token ids ``[pos]`` / ``[1, pos]``, or a :class:`~tl_tensorlens.capture.FrozenState`
            (its logits are reused).
        position: the position read (default the last).
        k: how many predictions.
        answer: a string (needs the tokenizer): its first token's rank at ``position``; for a
            multi-token answer read at the last position, each further token is read after the
            previous ones (one more forward pass on ``prompt + answer[:-1]``).

    Raises:
        UnsupportedModelError: an encoder.
        ArgumentError: bad ``k``/``position``, an empty answer, or an answer without a tokenizer.

    Example:
        >>> import torch
        >>> from transformer_lens.config import TransformerBridgeConfig
        >>> from transformer_lens.model_bridge import TransformerBridge
        >>> cfg = TransformerBridgeConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16,
        ...     d_vocab=11, n_ctx=8, act_fn="gelu_new", seed=0)
        >>> model = TransformerBridge.boot_native(cfg).eval()
        >>> s = prediction_summary(model, torch.tensor([1, 2, 3]), k=3)
        >>> len(s.top_ids), abs(sum(s.top_probs) - 1) < 1
        (3, True)
    """
    if not has_unembedding(model):
        raise UnsupportedModelError({"model": "a prediction summary needs a decoder with an unembedding"})
    if isinstance(prompt, FrozenState) and prompt.logits is not None:
        tokens, logits = prompt.tokens, prompt.logits[0]
    else:
        tokens = prompt.tokens if isinstance(prompt, FrozenState) else as_prompt_tokens(prompt, model)
        with torch.no_grad():
            logits = model(tokens)[0]
    n = int(tokens.shape[-1])
    p = as_position("position", position, n)
    d_vocab = int(logits.shape[-1])
    k = as_int("k", k, lo=1, hi=d_vocab)
    logp = torch.log_softmax(logits.double(), -1)
    top = logp[p].topk(k)
    ranks: list[AnswerRank] = []
    if answer is not None:
        if not isinstance(answer, str) or not answer:
            raise ArgumentError("answer", answer, "a non-empty string")
        if getattr(model, "tokenizer", None) is None:
            raise ArgumentError("answer", answer, "token ids: this model has no tokenizer to read a string with")
        ids = model.to_tokens(answer, prepend_bos=False)[0].to(tokens.device)
        if ids.numel() == 0:
            raise ArgumentError("answer", answer, "a string that tokenizes to at least one token")
        if ids.numel() > 1 and p == n - 1:
            with torch.no_grad():
                ext = model(torch.cat([tokens.reshape(1, -1), ids[None, :-1]], dim=-1))[0]
            ext_logits: Tensor = ext[n - 1 :]
        else:
            ids = ids[:1]
            ext_logits = logits[p : p + 1]
        ext_logp = torch.log_softmax(ext_logits.double(), -1)
        for m, tid in enumerate(ids.tolist()):
            row = ext_logp[m]
            ranks.append(
                AnswerRank(
                    token=_decode(model, tid),
                    token_id=int(tid),
                    position=p + m,
                    rank=int((row > row[tid]).sum()),
                    prob=float(row[tid].exp()),
                    logit=float(ext_logits[m, tid]),
                )
            )
    return PredictionSummary(
        position=p,
        top_tokens=tuple(_decode(model, int(t)) for t in top.indices),
        top_ids=tuple(int(t) for t in top.indices),
        top_probs=tuple(float(v.exp()) for v in top.values),
        top_logits=tuple(float(logits[p, int(t)]) for t in top.indices),
        answer=answer,
        answer_ranks=tuple(ranks),
    )


__all__ = ["AnswerRank", "PredictionSummary", "prediction_summary"]
