"""The errors users see as one line: bad input (naming the file, the line and the field) and a failed judge."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input (a data file, a recipe, an option). The CLI prints it alone and exits with 2.

    >>> str(InputError("missing field", file="q.jsonl", line=3, field="_id"))
    'q.jsonl:3: field `_id`: missing field'
    """

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        if field is not None:
            where += f"field `{field}`: "
        super().__init__(where + message)


class JudgeError(RuntimeError):
    """A judge raised, timed out or returned something that is not a finite (B, K) score matrix (under
    ``lsr_on_error=error``). The CLI prints it alone and exits with 1. Re-exported as rag_capg.judges.JudgeError."""
