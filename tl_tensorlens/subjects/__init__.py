"""Real subjects: offline loading of local checkpoints (MiniLM), a polarity head, decoders trained with known ground truth, a WikiText-2 language model built locally, and two real LLMs from GGUF packages (SmolLM2-135M, Gemma-3-270M)."""

from tl_tensorlens.subjects.induction import (
    InductionBatch,
    InductionConfig,
    evaluate_induction,
    induction_batch,
    train_induction,
)
from tl_tensorlens.subjects.llm import (
    LLMSpec,
    build_llm_subject,
    hf_tokens,
    llm_spec,
    load_llm,
)
from tl_tensorlens.subjects.loading import (
    final_hidden_hook,
    load_local,
    load_minilm,
    load_tokenizer,
    minilm_path,
)
from tl_tensorlens.subjects.polarity import (
    PolarityHead,
    cls_features,
    load_polarity_data,
    load_polarity_head,
    train_polarity,
)
from tl_tensorlens.subjects.registry import (
    Subject,
    SubjectInfo,
    list_subjects,
    load_relation_specs,
    load_subject,
    subject_path,
)
from tl_tensorlens.subjects.relation_model import (
    Fact,
    RelationConfig,
    evaluate_relations,
    few_shot_prompt,
    make_facts,
    relation_specs,
    train_relations,
)
from tl_tensorlens.subjects.wikitext import (
    WikiTextConfig,
    build_wikitext_subject,
    evaluate_wikitext,
    heldout_windows,
    load_wikitext,
    train_wikitext,
    wikitext_cache_dir,
)

__all__ = [
    "Fact",
    "InductionBatch",
    "InductionConfig",
    "LLMSpec",
    "PolarityHead",
    "RelationConfig",
    "Subject",
    "SubjectInfo",
    "WikiTextConfig",
    "build_llm_subject",
    "build_wikitext_subject",
    "cls_features",
    "evaluate_induction",
    "evaluate_relations",
    "evaluate_wikitext",
    "few_shot_prompt",
    "heldout_windows",
    "hf_tokens",
    "final_hidden_hook",
    "induction_batch",
    "list_subjects",
    "llm_spec",
    "load_llm",
    "load_local",
    "load_minilm",
    "load_polarity_data",
    "load_polarity_head",
    "load_relation_specs",
    "load_subject",
    "load_tokenizer",
    "load_wikitext",
    "make_facts",
    "minilm_path",
    "relation_specs",
    "subject_path",
    "train_induction",
    "train_polarity",
    "train_relations",
    "train_wikitext",
    "wikitext_cache_dir",
]
