"""What every command shares: the argument parser that raises, model loading, prompt parsing."""

import argparse
from pathlib import Path
from typing import Any, NoReturn

from tl_tensorlens.errors import CliError

PROG = "tl-tensorlens"
DEFAULT_MODEL = "default"
#: The subject ``default`` stands for: a 2-layer GPT-2 trained on induction (committed checkpoint).
DEFAULT_SUBJECT = "induction"
#: The default prompt: ``<bos> A A[:-1]`` for a 7-token segment A of the induction vocabulary, so the
#: last position's answer (t27) is decided by induction.
DEFAULT_PROMPT = "<bos> t83 t94 t12 t35 t43 t80 t27 t83 t94 t12 t35 t43 t80"
DTYPES = ("float32", "float64", "bfloat16")


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message} (see --help)")


def existing_folder_or_new(value: str, flag: str = "--out") -> Path:
    """``--out``: a folder (created later) that must not be an existing file."""
    out = Path(value)
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {value!r} exists and is not a folder")
    return out


def to_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]


def _subject_names() -> list[str]:
    from tl_tensorlens.subjects import list_subjects

    return [s.name for s in list_subjects()]


def load_model(name: str, *, backend: str = "auto", dtype: str = "float32", device: str = "cpu") -> tuple[Any, str]:
    """Resolve ``--model``: ``default``, a subject name, a checkpoint folder, or a hub name.

    Returns:
        ``(model, label)``.

    Raises:
        CliError: the name is none of these.
    """
    model, label, _ = load_model_and_head(name, backend=backend, dtype=dtype, device=device)
    return model, label


def load_model_and_head(
    name: str, *, backend: str = "auto", dtype: str = "float32", device: str = "cpu"
) -> tuple[Any, str, Any]:
    """:func:`load_model` plus the subject's readout head (``polarity``, ``polarity_ft``; else None)."""
    from tl_tensorlens.subjects import load_local, load_subject

    if name in (DEFAULT_MODEL, *_subject_names()):
        subject = DEFAULT_SUBJECT if name == DEFAULT_MODEL else name
        loaded = load_subject(subject, backend=backend, dtype=to_dtype(dtype), device=device)  # type: ignore[arg-type]
        return loaded.model, subject, loaded.head
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CliError(f"--model {name!r}: a folder but not a checkpoint (no config.json)")
        model = load_local(path, backend=backend, dtype=to_dtype(dtype), device=device)  # type: ignore[arg-type]
        return model, path.name, None
    return _load_hub(name, backend, dtype).to(device), name, None


def _load_hub(name: str, backend: str, dtype: str) -> Any:
    """A hub model through TransformerLens (only for names TL knows; needs the network or a cache)."""
    from tl_tensorlens._backend import has_hooked_transformer

    known_hint = f"run '{PROG} list models' for built-in names, or pass a checkpoint folder"
    use_hooked = has_hooked_transformer() and backend in ("auto", "hooked")
    if use_hooked:
        from transformer_lens import loading_from_pretrained

        try:
            official = loading_from_pretrained.get_official_model_name(name)
        except ValueError:
            raise CliError(
                f"unknown model {name!r}: not a built-in name, not a folder, not a TransformerLens model name; {known_hint}"
            ) from None
        from transformer_lens import HookedTransformer

        try:
            return HookedTransformer.from_pretrained_no_processing(official, dtype=to_dtype(dtype)).eval()
        except OSError as e:
            raise CliError(
                f"model {name!r} could not be loaded from the Hugging Face hub (offline?): {str(e).splitlines()[0]}"
            ) from None
    if "/" not in name and not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise CliError(f"unknown model {name!r}; {known_hint}")
    try:
        from transformer_lens.model_bridge import TransformerBridge

        return TransformerBridge.boot_transformers(name, dtype=to_dtype(dtype)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CliError(
            f"unknown model {name!r} (not built in, not a folder, and the hub gave: {str(e).splitlines()[0]}); {known_hint}"
        ) from None


def parse_ids(tokens: str) -> list[int]:
    try:
        ids = [int(t) for t in tokens.replace(",", " ").split()]
    except ValueError:
        raise CliError(f"--tokens must be integers separated by spaces or commas, got {tokens!r}") from None
    if not ids:
        raise CliError("--tokens is empty")
    return ids


def prompt_tokens(model: Any, prompt: str | None, ids: list[int] | None, is_default: bool) -> Any:
    import torch

    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    d_vocab = int(model.cfg.d_vocab)
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise CliError(f"--tokens: ids {bad[:5]} outside the vocabulary 0..{d_vocab - 1}")
        out = torch.tensor([ids])
    else:
        if prompt is None:
            if not is_default:
                raise CliError("--prompt (or --tokens) is required for this model")
            prompt = DEFAULT_PROMPT
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise CliError("this model has no tokenizer; pass --tokens")
        bos = getattr(tok, "bos_token", None)
        # A prompt that already starts with BOS (the induction format) must not get a second one.
        prepend = bool(bos) and not prompt.lstrip().startswith(bos)
        out = (
            model.to_tokens(prompt, prepend_bos=prepend, truncate=False)
            if hasattr(model, "to_tokens")
            else torch.tensor([tok.encode(prompt)])
        )
    if n_ctx and out.shape[-1] > n_ctx:
        raise CliError(f"the prompt has {out.shape[-1]} tokens, longer than the model's context n_ctx={n_ctx}")
    return out
