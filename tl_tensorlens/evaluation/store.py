"""One resumable results store for every study and command: a JSONL file, one row per line.

Crash semantics, the same everywhere:

* **Appends are durable.** Each :meth:`ResultStore.append` writes whole lines, flushes and
  ``fsync``\\ s before it returns, so a row that was reported written survives a kill or power loss.
* **A torn tail is cut.** A kill in the middle of a write leaves a last line without its newline;
  opening the store truncates it (those rows were never reported written and are recomputed).
* **A corrupt line is reported and moved aside.** A complete line that is not a JSON object (a disk
  error, a hand edit) is removed from the file, appended to ``<file>.corrupt`` next to it, and a
  :class:`ResultsStoreWarning` names the file and line; its rows are recomputed. Nothing is
  silently dropped, and no error repeats on every rerun.
* **Keys are unique.** Rows are identified by ``key_fields`` (which should include the model's
  fingerprint, the example's content hash and the settings). Two rows with one key but different
  values are an error (:class:`~tl_tensorlens.errors.ResultsStoreError`, naming both lines), never a
  silent first-wins; identical duplicates are kept once.
"""

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tl_tensorlens.errors import ResultsStoreError


class ResultsStoreWarning(UserWarning):
    """A results file held corrupt lines; they were moved to ``<file>.corrupt``."""


Row = dict[str, Any]


class ResultStore:
    """A JSONL results file keyed by ``key_fields``.

    Args:
        path: the file (created with its folder on the first append).
        key_fields: the fields that identify a row.
        compare_ignore: fields left out when deciding whether two rows with one key conflict (e.g.
            wall times).
        upgrade: applied to every row read (renames of old field names), before keying.

    Example:
        >>> import tempfile, os
        >>> store = ResultStore(os.path.join(tempfile.mkdtemp(), "rows.jsonl"), key_fields=("example",))
        >>> store.append([{"example": "a", "value": 1.0}])
        >>> store.has(("a",)), len(ResultStore(store.path, key_fields=("example",)))
        (True, 1)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key_fields: Sequence[str],
        *,
        compare_ignore: Sequence[str] = (),
        upgrade: Callable[[Row], Row] | None = None,
    ):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self.compare_ignore = frozenset(compare_ignore)
        self.upgrade = upgrade
        self._rows: dict[tuple[Any, ...], Row] = {}
        self._line_of: dict[tuple[Any, ...], int] = {}
        self._n_lines = 0
        self._load()

    # ------------------------------------------------------------------ reading
    def key(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The key of a row (floats rounded to 9 digits so 0.1 + 0.2 and 0.3 agree)."""
        try:
            return tuple(round(row[f], 9) if isinstance(row[f], float) else _freeze(row[f]) for f in self.key_fields)
        except KeyError as e:
            raise ResultsStoreError(f"{self.path}: a row lacks the key field {e.args[0]!r}: {dict(row)}") from None

    def _comparable(self, row: Row) -> Row:
        return {k: v for k, v in row.items() if k not in self.compare_ignore}

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):
            # The last write did not finish: cut it so the next append starts on a fresh line.
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
            data = data[:good_end]
        kept: list[bytes] = []
        corrupt: list[tuple[int, bytes]] = []
        for number, raw in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError):
                corrupt.append((number, raw))
                continue
            kept.append(raw)
            self._add(row, number)
        if corrupt:
            self._move_aside(kept, corrupt)
        self._n_lines = len(kept)

    def _move_aside(self, kept: list[bytes], corrupt: list[tuple[int, bytes]]) -> None:
        side = self.path.with_name(self.path.name + ".corrupt")
        with open(side, "ab") as fh:
            for number, raw in corrupt:
                fh.write(f"# {self.path.name}:{number}\n".encode() + raw + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(b"".join(line + b"\n" for line in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        lines = ", ".join(str(n) for n, _ in corrupt[:10]) + (" ..." if len(corrupt) > 10 else "")
        warnings.warn(
            f"{self.path}: {len(corrupt)} corrupt line(s) (line {lines}) moved to {side}; their rows will be recomputed",
            ResultsStoreWarning,
            stacklevel=3,
        )

    def _add(self, row: Row, line: int) -> None:
        if self.upgrade is not None:
            row = self.upgrade(row)
        k = self.key(row)
        old = self._rows.get(k)
        if old is not None:
            if self._comparable(old) != self._comparable(row):
                raise ResultsStoreError(
                    f"{self.path}: lines {self._line_of[k]} and {line} hold different rows for the key "
                    f"{dict(zip(self.key_fields, k, strict=True))}; remove one of them"
                )
            return
        self._rows[k] = row
        self._line_of[k] = line

    def has(self, key: tuple[Any, ...]) -> bool:
        """True when a row with this key is stored."""
        return key in self._rows

    def get(self, key: tuple[Any, ...]) -> Row | None:
        return self._rows.get(key)

    @property
    def rows(self) -> list[Row]:
        """Every row, in file order, each key once."""
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, row: Mapping[str, Any]) -> bool:
        return self.key(row) in self._rows

    # ------------------------------------------------------------------ writing
    def append(self, rows: Iterable[Row]) -> None:
        """Write ``rows`` (one ``write`` + ``fsync``); rows already stored identically are skipped,
        a row that conflicts with a stored one is an error (nothing is written then)."""
        new: list[Row] = []
        for row in rows:
            k = self.key(row)
            old = self._rows.get(k)
            if old is not None:
                if self._comparable(old) != self._comparable(row):
                    raise ResultsStoreError(
                        f"{self.path}: a new row conflicts with line {self._line_of[k]} for the key "
                        f"{dict(zip(self.key_fields, k, strict=True))}"
                    )
                continue
            new.append(row)
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, sort_keys=False) + "\n" for r in new)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        for r in new:
            self._n_lines += 1
            k = self.key(r)
            self._rows[k] = r
            self._line_of[k] = self._n_lines


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


__all__ = ["ResultStore", "ResultsStoreWarning"]
