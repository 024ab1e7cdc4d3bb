"""Bad-input errors and the count of skipped rows.

Every malformed row is either refused with a :class:`DataError` that names the file, the
row and the field, or (with ``data.skip_bad_rows``) skipped and counted by reason in a
:class:`SkipReport` -- never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional


class DataError(ValueError):
    """A problem with one input file, row or field.

    ``str(err)`` reads ``"{file}: row {row}: field '{field}': {problem}"``; the row and field
    parts are left out when the problem concerns the whole file (``row``/``field`` None).

    Attributes:
        file: label of the file or dataset (a path, or ``name[split]`` for a hub dataset).
        row: 0-based row index (the 0-based line index for JSON Lines), or None.
        field: the column, dotted for nested ones (``info.post``, ``summaries[1].text``), or None.
        problem: what is wrong, in words.
        reason: a short stable category used to count skipped rows (defaults to ``problem``).
    """

    def __init__(self, file: str, row: Optional[int], field: Optional[str], problem: str,
                 reason: Optional[str] = None) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.problem = problem
        self.reason = reason or problem
        parts = [str(file)]
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        parts.append(problem)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keep the fields when pickled (dataloader workers, multiprocessing)
        return (DataError, (self.file, self.row, self.field, self.problem, self.reason))


class SkipReport:
    """Counts of rows skipped with ``skip_bad_rows=True``, per reason.

    ``total`` is the number of skipped rows, ``seen`` the number of rows read. The first
    ``keep_examples`` error messages are kept so a log can show what a skipped row looked like.
    ``filtered`` counts rows left out by design rather than for being malformed (e.g. CNN/DM
    comparisons in the TL;DR preference data), always, whatever ``skip_bad_rows`` says.
    """

    def __init__(self, file: str = "", keep_examples: int = 5) -> None:
        self.file = file
        self.counts: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.examples: list[str] = []
        self.seen = 0
        self._keep = keep_examples

    def add(self, err: DataError) -> None:
        """Count one skipped row under ``err.reason``."""
        self.counts[err.reason] += 1
        if len(self.examples) < self._keep:
            self.examples.append(str(err))

    def merge(self, other: "SkipReport") -> "SkipReport":
        """Add another report's counts (e.g. a file-level report into a tokenizer-level one)."""
        self.counts.update(other.counts)
        self.filtered.update(other.filtered)
        self.seen += other.seen
        for e in other.examples:
            if len(self.examples) < self._keep:
                self.examples.append(e)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """JSON-ready summary: ``{"file", "seen", "skipped", "reasons": {reason: count}, "examples"}``,
        plus ``"filtered": {reason: count}`` when rows were filtered."""
        d = {"file": self.file, "seen": self.seen, "skipped": self.total,
             "reasons": dict(sorted(self.counts.items())), "examples": list(self.examples)}
        if self.filtered:
            d["filtered"] = dict(sorted(self.filtered.items()))
        return d

    def __str__(self) -> str:
        kept = ""
        if self.filtered:
            kept = "; left out " + ", ".join(f"{n} {r} row{'s' if n != 1 else ''}" for r, n in sorted(self.filtered.items()))
        if not self.total:
            return f"{self.file}: no rows skipped ({self.seen} read){kept}"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"{self.file}: skipped {self.total} of {self.seen} rows ({reasons}){kept}"

    def __repr__(self) -> str:
        return f"SkipReport({self.as_dict()!r})"
