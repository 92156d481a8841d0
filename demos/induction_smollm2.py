"""Induction heads of a real model (SmolLM2-135M) found through the tensor, next to TL's induction score.

On a random token segment ``A`` repeated twice (``A A``), a model that has learnt induction predicts
the second copy: at position ``q`` of the copy it attends to the token *after* the earlier
occurrence of the current token (source ``q - S + 1`` for a segment of length ``S``) and copies it.

Two head scores, over every (layer, head):

* **TL's induction score** (the standard one, as in TransformerLens' tutorials): the mean attention
  on the induction diagonal, ``mean_q A_h[q, q - S + 1]`` over the second copy;
* **tensor induction contribution**: through the per-head decomposition of the frozen model
  (:func:`tl_tensorlens.methods.heads.head_contributions` with ``edges=True``), how much of the logit of
  the *correct next token* at ``q`` flows through that head's attention edge ``q ← q - S + 1``
  (``A_h[q, j] · g_h[q]ᵀ v_h[j]``: attention times what its OV output does to that logit downstream),
  averaged over ``q``.

The first asks "does the head look at the right token", the second "does what it reads from there
reach the copied token's logit". Their rank agreement (Spearman over all heads), the top heads both
ways, and the heads where they disagree (attend but do not copy, or the reverse) are printed.

    python demos/induction_smollm2.py --segment 12 --n-seq 2 --out out/induction_smollm2
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (average ranks for ties)."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1).double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # ties: average rank
            m = x == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; prints both rankings and writes ``induction_heads.json`` and a figure under ``--out``."""
    from tl_tensorlens import capture
    from tl_tensorlens.methods.heads import head_contributions
    from tl_tensorlens.subjects import load_subject

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="smollm2", help="a subject name (default: smollm2)")
    p.add_argument("--backend", default="bridge", choices=["auto", "hooked", "bridge"])
    p.add_argument("--segment", type=int, default=12, help="length S of the random segment (sequence: A A)")
    p.add_argument("--n-seq", type=int, default=2, help="random sequences averaged over")
    p.add_argument("--top", type=int, default=10, help="heads listed each way")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/induction_smollm2")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = load_subject(args.model, backend=args.backend, dtype=torch.float32).model
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    S = args.segment
    gen = torch.Generator().manual_seed(args.seed)
    # ordinary vocabulary ids (no special tokens: SmolLM2's specials sit below 20)
    lo, hi = 1000, min(int(model.cfg.d_vocab), 20000)
    attn_score = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    tensor_score = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    total_contrib = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    correct, count = 0, 0
    for _ in range(args.n_seq):
        seg = torch.randint(lo, hi, (S,), generator=gen)
        tokens = torch.cat([seg, seg])[None]  # no BOS: the subject's tokenizer adds none
        state = capture(model, tokens)
        assert state.logits is not None
        qs = list(range(S, 2 * S - 1))  # second copy; the next token is known (tokens[q + 1])
        for q in qs:
            src = q - S + 1
            target = int(tokens[0, q + 1])
            correct += int(int(state.logits[0, q].argmax()) == target)
            count += 1
            hc = head_contributions(model, state, position=q, token=target, edges=True)
            assert hc.by_edge is not None
            tensor_score += hc.by_edge[:, :, q, src].double()
            total_contrib += hc.contributions.double()
            for layer in range(n_layers):
                attn_score[layer] += state.pattern(layer)[:, q, src].double()
    attn_score /= count
    tensor_score /= count
    total_contrib /= count

    rho = spearman(attn_score, tensor_score)

    def top(score: torch.Tensor) -> list[tuple[int, int]]:
        order = torch.argsort(score.reshape(-1), descending=True)[: args.top]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]

    top_attn, top_tensor = top(attn_score), top(tensor_score)
    overlap = len(set(top_attn) & set(top_tensor))
    union = sorted(set(top_attn) | set(top_tensor))
    rho_top = spearman(torch.tensor([attn_score[h] for h in union]), torch.tensor([tensor_score[h] for h in union]))
    elapsed = time.perf_counter() - t0
    print(
        f"{args.model}: {args.n_seq} random sequences A A with |A| = {S}; next-token accuracy on the second copy "
        f"{correct}/{count} (induction at work)"
    )
    print(f"Spearman rank agreement over all {n_layers * n_heads} heads (TL induction score vs tensor): {rho:.3f}")
    print(
        f"top {args.top} overlap: {overlap}/{args.top}; Spearman over the {len(union)} heads in either top: {rho_top:.3f}"
    )
    print(f"{'rank':>4}  {'by TL induction score':<34}  {'by tensor contribution to the copied logit':<44}")
    for r, (a, b) in enumerate(zip(top_attn, top_tensor, strict=True)):
        la = f"L{a[0]}H{a[1]} attn {attn_score[a]:.3f} (tensor {tensor_score[a]:+.3f})"
        lb = f"L{b[0]}H{b[1]} tensor {tensor_score[b]:+.3f} (attn {attn_score[b]:.3f})"
        print(f"{r + 1:>4}  {la:<34}  {lb:<44}")
    attends_no_copy = [h for h in top_attn if h not in top_tensor]
    print(
        "in TL's top but not the tensor's (attend to the induction source, but move the copied token's logit "
        "little, or down): "
        + (", ".join(f"L{a}H{b} ({tensor_score[a, b]:+.3f})" for a, b in attends_no_copy) or "none")
    )
    print(f"elapsed {elapsed:.0f} s")

    result = {
        "model": args.model,
        "segment": S,
        "n_seq": args.n_seq,
        "seed": args.seed,
        "accuracy_second_copy": correct / count,
        "spearman_all_heads": rho,
        "spearman_union_of_tops": rho_top,
        "top_overlap": overlap,
        "top_by_attention": [[a, b, float(attn_score[a, b]), float(tensor_score[a, b])] for a, b in top_attn],
        "top_by_tensor": [[a, b, float(attn_score[a, b]), float(tensor_score[a, b])] for a, b in top_tensor],
        "attention_score": attn_score.tolist(),
        "tensor_score": tensor_score.tolist(),
        "total_contribution": total_contrib.tolist(),
    }
    (out / "induction_heads.json").write_text(json.dumps(result, indent=1))
    try:
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is optional (the plot extra)
        return 0

    fig = Figure(figsize=(14, 8), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1, 1, 1.2])
    m = float(tensor_score.abs().max()) or 1.0
    panels = (
        (a1, attn_score, "TL induction score", {"cmap": "viridis"}),
        (a2, tensor_score, "tensor contribution", {"cmap": "RdBu_r", "norm": TwoSlopeNorm(0.0, -m, m)}),
    )
    for ax, score, name, style in panels:
        im = ax.imshow(score.numpy(), aspect="auto", interpolation="nearest", **style)
        fig.colorbar(im, ax=ax, fraction=0.05)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    a3.scatter(attn_score.reshape(-1), tensor_score.reshape(-1), s=8)
    for a, b in set(top_attn) | set(top_tensor):
        a3.annotate(f"L{a}H{b}", (float(attn_score[a, b]), float(tensor_score[a, b])), fontsize=6)
    a3.set_xlabel("TL induction score (attention on the induction diagonal)")
    a3.set_ylabel("tensor: contribution of the edge q ← q−S+1 to the copied token's logit")
    a3.set_title(f"Spearman {rho:.2f} over all heads", fontsize=9)
    a3.grid(alpha=0.3)
    fig.savefig(out / "induction_heads.png", dpi=100)
    print(f"wrote {out / 'induction_heads.json'}, {out / 'induction_heads.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
