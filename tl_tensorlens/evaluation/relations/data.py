"""Relation data: the LRE JSON format (Hernandez et al. 2024) and the project's synthetic relations.

A relation file holds ``name``, ``prompt_templates`` (``{}`` marks the subject),
``prompt_templates_zs`` (zero-shot variants), optional ``properties`` and
``samples: [{"subject": ..., "object": ...}]``. The same format is read from a file, a folder
(every ``*.json`` below it), or an ``http(s)://`` URL.
"""

import json
import os
import re
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tl_tensorlens._paths import DATA_ENV, data_dir
from tl_tensorlens.errors import RelationDataError

__all__ = [
    "Relation",
    "RelationDataError",
    "RelationSample",
    "default_data_dir",
    "load_relation",
    "load_relations",
    "relation_from_dict",
]

DATA_ENV_VAR = DATA_ENV


# Some LRE files store non-ASCII text double-escaped (the JSON holds a literal ``\u00ed``), so
# ``json.load`` yields a backslash sequence instead of "í"; decode it so the tokenizer sees text.
_LITERAL_UNICODE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _clean(text: str) -> str:
    return _LITERAL_UNICODE.sub(lambda m: chr(int(m.group(1), 16)), text).strip()


@dataclass(frozen=True)
class RelationSample:
    """One fact ``subject → object`` of a relation.

    Example:
        >>> RelationSample("France", "Paris")
        RelationSample(subject='France', object='Paris')
    """

    subject: str
    object: str


@dataclass(frozen=True)
class Relation:
    """A relation: prompt templates and its subject → object samples.

    Attributes:
        name: Relation name, e.g. ``"country capital city"``.
        prompt_templates: Few-shot templates; ``{}`` marks the subject, the object follows.
        prompt_templates_zs: Zero-shot templates (kept for completeness; not used by the study).
        samples: The facts.
        properties: Free metadata from the file (``relation_type``, ``domain_name``, ...).
        source: Where the relation was read from (a path, URL or ``"<memory>"``).
        few_shot_separator: Text joining few-shot demonstrations, when the file names one (the
            project's synthetic relations do: ``" . "``); ``None`` leaves the choice to the prompt
            format (a newline, as in LRE).

    Example:
        >>> r = Relation("capital", ("The capital of {} is",), (), (RelationSample("France", "Paris"),))
        >>> r.key, len(r)
        ('capital', 1)
    """

    name: str
    prompt_templates: tuple[str, ...]
    prompt_templates_zs: tuple[str, ...]
    samples: tuple[RelationSample, ...]
    properties: Mapping[str, Any] = field(default_factory=dict, compare=False)
    source: str = "<memory>"
    few_shot_separator: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def key(self) -> str:
        """The name as a file-name-like key (``"country capital city"`` → ``country_capital_city``)."""
        return re.sub(r"[^0-9a-zA-Z]+", "_", self.name).strip("_").lower()

    @property
    def relation_type(self) -> str | None:
        """``properties["relation_type"]`` (factual, commonsense, linguistic, bias), if given."""
        value = self.properties.get("relation_type")
        return None if value is None else str(value)

    def unique_samples(self) -> "Relation":
        """A copy without repeated subjects (first occurrence kept), so splits never leak a subject.

        Example:
            >>> s = (RelationSample("a", "x"), RelationSample("a", "y"), RelationSample("b", "x"))
            >>> len(Relation("r", ("{} is",), (), s).unique_samples())
            2
        """
        seen: set[str] = set()
        kept = []
        for sample in self.samples:
            if sample.subject not in seen:
                seen.add(sample.subject)
                kept.append(sample)
        return replace(self, samples=tuple(kept))


def relation_from_dict(data: Mapping[str, Any], *, source: str = "<memory>") -> Relation:
    """Build a :class:`Relation` from one parsed LRE JSON object, validating it.

    Args:
        data: The parsed JSON object.
        source: Where it came from, for error messages.

    Returns:
        The relation.

    Raises:
        RelationDataError: A required key is missing, a template lacks ``{}``, or a sample lacks
            ``subject``/``object``.

    Example:
        >>> r = relation_from_dict({"name": "r", "prompt_templates": ["{} is"],
        ...                         "samples": [{"subject": "a", "object": "b"}]})
        >>> r.samples
        (RelationSample(subject='a', object='b'),)
    """
    missing = [k for k in ("name", "prompt_templates", "samples") if k not in data]
    if missing:
        raise RelationDataError(f"{source}: not an LRE relation, missing key(s) {missing}")
    templates = tuple(str(t) for t in data["prompt_templates"])
    templates_zs = tuple(str(t) for t in data.get("prompt_templates_zs", ()))
    if not templates:
        raise RelationDataError(f"{source}: 'prompt_templates' is empty")
    for template in templates + templates_zs:
        if "{}" not in template:
            raise RelationDataError(f"{source}: template {template!r} has no '{{}}' for the subject")
    samples = []
    for i, sample in enumerate(data["samples"]):
        if not isinstance(sample, Mapping) or "subject" not in sample or "object" not in sample:
            raise RelationDataError(f"{source}: samples[{i}] = {sample!r} needs 'subject' and 'object'")
        samples.append(RelationSample(_clean(str(sample["subject"])), _clean(str(sample["object"]))))
    return Relation(
        name=str(data["name"]),
        prompt_templates=templates,
        prompt_templates_zs=templates_zs,
        samples=tuple(samples),
        properties=dict(data.get("properties", {})),
        source=source,
        few_shot_separator=None if data.get("few_shot_separator") is None else str(data["few_shot_separator"]),
    )


def default_data_dir() -> Path:
    """The data folder ``$TL_TENSORLENS_DATA`` (see :func:`tl_tensorlens._paths.data_dir`).

    Raises:
        DataError: the variable is unset or names no folder.
    """
    return data_dir()


def _read_json(location: str) -> Any:
    if re.match(r"^https?://", location):
        with urllib.request.urlopen(location, timeout=30) as response:  # noqa: S310 - user-given URL
            return json.loads(response.read().decode("utf-8"))
    with open(location, encoding="utf-8") as handle:
        return json.load(handle)


def load_relation(location: str | os.PathLike[str]) -> Relation:
    """Load one relation from an LRE JSON file path or ``http(s)://`` URL.

    Args:
        location: File path or URL.

    Returns:
        The relation.

    Raises:
        RelationDataError: The file is missing, not JSON, or not in the LRE format.
    """
    location = str(location)
    try:
        data = _read_json(location)
    except (OSError, ValueError) as err:
        raise RelationDataError(f"cannot read relation file {location!r}: {err}") from err
    if not isinstance(data, Mapping):
        raise RelationDataError(f"{location}: expected a JSON object, got {type(data).__name__}")
    return relation_from_dict(data, source=location)


def _match(relation: Relation, names: Iterable[str] | None) -> bool:
    if names is None:
        return True
    wanted = {re.sub(r"[^0-9a-zA-Z]+", "_", n).strip("_").lower() for n in names}
    return relation.key in wanted


def load_relations(
    path: str | os.PathLike[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    relation_types: Sequence[str] | None = None,
) -> list[Relation]:
    """Load LRE relations from a file, a folder (recursively) or a URL.

    Args:
        path: A ``.json`` file, a folder searched recursively for ``*.json``, or an ``http(s)://``
            URL. ``None`` reads ``default_data_dir() / "relations"``.
        names: Keep only these relations (matched on :attr:`Relation.key`, so
            ``"country capital city"`` and ``"country_capital_city"`` both work).
        relation_types: Keep only these ``properties["relation_type"]`` values (e.g. ``["factual"]``).

    Returns:
        The relations, sorted by (relation type, key).

    Raises:
        RelationDataError: The path does not exist, holds no relation, or a requested name is absent.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "r.json").write_text(json.dumps({"name": "r", "prompt_templates": ["{} is"],
        ...                                           "samples": [{"subject": "a", "object": "b"}]}))
        >>> [r.name for r in load_relations(d)]
        ['r']
    """
    location = default_data_dir() / "relations" if path is None else path
    text = str(location)
    if re.match(r"^https?://", text):
        relations = [load_relation(text)]
    else:
        root = Path(location)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*.json") if p.is_file())
        elif root.is_file():
            files = [root]
        else:
            hint = f" (set ${DATA_ENV_VAR} or pass a path)" if path is None else ""
            raise RelationDataError(f"no relation data at {root}{hint}")
        relations = [load_relation(f) for f in files]
    if relation_types is not None:
        relations = [r for r in relations if r.relation_type in set(relation_types)]
    kept = [r for r in relations if _match(r, names)]
    if names is not None:
        found = {r.key for r in kept}
        absent = [n for n in names if re.sub(r"[^0-9a-zA-Z]+", "_", n).strip("_").lower() not in found]
        if absent:
            raise RelationDataError(
                f"relation(s) {absent} not found in {location}; available: {sorted(r.key for r in relations)}"
            )
    if not kept:
        raise RelationDataError(f"no relation found in {location}")
    return sorted(kept, key=lambda r: (r.relation_type or "", r.key))
