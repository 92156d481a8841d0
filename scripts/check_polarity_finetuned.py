"""Measure how exactly TransformerLens and the lens reproduce the polarity_ft subject's class logits.

python scripts/check_polarity_finetuned.py                # the build in $TL_TENSORLENS_CACHE/subjects/polarity_ft
python scripts/check_polarity_finetuned.py --folder some/build --n-sentences 4

For every backend and dtype: max |TL - HF| of the [CLS] class logits (HF: ``BertModel``, eager
attention, one unpadded sentence at a time) on real test sentences and on one 128-token input; in
float64 also ``verify_replay(..., outputs=("resid_post",))`` and the class collapse identity
``collapse("in_class", W[:, c])[0].sum() + collapse_bias("in_class", W[:, c])[0] + b[c] == logit_c``.
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tl_tensorlens import TensorLens, verify_replay
from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.subjects import final_hidden_hook, load_polarity_data, load_polarity_finetuned
from tl_tensorlens.subjects.loading import Backend
from tl_tensorlens.subjects.polarity_finetuned import finetuned_cache_dir

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(argv: Sequence[str] | None = None) -> int:
    """Print one JSON row per (backend, dtype)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", default=None, help=f"build folder (default: {finetuned_cache_dir()})")
    parser.add_argument("--data", default=str(DATA), help="folder holding text/rt-polarity.{pos,neg}")
    parser.add_argument("--n-sentences", type=int, default=8, help="real test sentences (plus one 128-token input)")
    parser.add_argument(
        "--n-lens", type=int, default=3, help="inputs for the float64 lens checks (the 128-token one last)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import BertModel

    test = load_polarity_data(0, path=Path(args.data) / "text").test.sentences
    backends: list[Backend] = ["hooked", "bridge"] if has_hooked_transformer() else ["bridge"]
    for dtype in (torch.float32, torch.float64):
        for backend in backends:
            s = load_polarity_finetuned(args.folder, backend=backend, dtype=dtype)
            head, model = s.head, s.model
            assert head is not None
            hf = BertModel.from_pretrained(str(s.path), dtype=dtype, attn_implementation="eager").eval()
            tok = model.tokenizer
            inputs = [tok(x, return_tensors="pt").input_ids for x in test[: args.n_sentences]]
            inputs.append(tok(" ".join(test[:40]), return_tensors="pt", truncation=True, max_length=128).input_ids)
            hook = final_hidden_hook(model)
            row: dict[str, object] = {"backend": backend, "dtype": str(dtype).removeprefix("torch.")}
            worst, logits = 0.0, []
            with torch.no_grad():
                for ids in inputs:
                    ref = head.logits(hf(input_ids=ids).last_hidden_state[0, 0])
                    _, cache = model.run_with_cache(ids, names_filter=hook)
                    got = head.logits(cache[hook][0, 0])
                    worst = max(worst, (got - ref).abs().max().item())
                    logits.append(got)
            row["max_abs_logit_diff_tl_vs_hf"] = worst
            row["max_abs_logit"] = max(x.abs().max().item() for x in logits)
            row["lengths"] = [int(x.shape[1]) for x in inputs]
            if dtype == torch.float64:
                lens_inputs = [*inputs[: args.n_lens - 1], inputs[-1]]
                rep = aff = coll = 0.0
                t0 = time.perf_counter()
                for ids, lg in zip(lens_inputs, [*logits[: args.n_lens - 1], logits[-1]], strict=True):
                    for c in verify_replay(model, ids, outputs=("resid_post",)):
                        rep, aff = max(rep, c.reproduction_error), max(aff, c.affine_error)
                    lens = TensorLens.from_model(model, ids, output="resid_post", verify=False)
                    for k in range(2):
                        d = head.W[:, k]
                        total = lens.collapse("in_class", direction=d, positions=[0])[0].sum()
                        total = total + lens.collapse_bias("in_class", direction=d)[0] + head.b[k]
                        coll = max(coll, abs(total.item() - lg[k].item()))
                row["verify_reproduction_error"] = rep
                row["verify_affine_error"] = aff
                row["max_abs_class_collapse_identity_error"] = coll
                row["lens_inputs"] = [int(x.shape[1]) for x in lens_inputs]
                row["lens_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
