"""Real subjects: offline loading of local checkpoints (MiniLM), polarity heads (frozen probe, fine-tuned encoder), decoders trained with known ground truth, and a WikiText-2 language model built locally."""

from tl_tensorlens.subjects.induction import (
    InductionBatch,
    InductionConfig,
    evaluate_induction,
    induction_batch,
    train_induction,
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
from tl_tensorlens.subjects.polarity_finetuned import (
    FinetuneConfig,
    build_polarity_finetuned,
    finetuned_cache_dir,
    load_polarity_finetuned,
    train_polarity_finetuned,
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
    "FinetuneConfig",
    "InductionBatch",
    "InductionConfig",
    "PolarityHead",
    "RelationConfig",
    "Subject",
    "SubjectInfo",
    "WikiTextConfig",
    "build_polarity_finetuned",
    "build_wikitext_subject",
    "cls_features",
    "evaluate_induction",
    "evaluate_relations",
    "evaluate_wikitext",
    "few_shot_prompt",
    "finetuned_cache_dir",
    "heldout_windows",
    "final_hidden_hook",
    "induction_batch",
    "list_subjects",
    "load_local",
    "load_minilm",
    "load_polarity_data",
    "load_polarity_finetuned",
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
    "train_polarity_finetuned",
    "train_relations",
    "train_wikitext",
    "wikitext_cache_dir",
]
