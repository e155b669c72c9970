"""Files: atomic writes with ordinary permissions, text read line by line with errors that name the line, and
a writability check made before any expensive work.

Every output is written to a temporary file (or folder) beside its target, then renamed. A run killed half-way
therefore leaves either the old file or the new one, never a torn one (os.replace is atomic on POSIX and
Windows when source and target share a filesystem); what it may leave is a hidden temporary named
``.<target>.<random>`` (see ``orphaned_temporaries``).

``tempfile.mkstemp`` / ``mkdtemp`` create their file 0600 and their folder 0700 whatever the umask; renamed
into place as they are, every model folder, results.json and cache would be unreadable to other users (a
serving account, a shared box). The temporaries are therefore given the mode a plain ``open(path, "w")`` /
``mkdir`` would have: 0666 / 0777 less the umask, or the mode of the file they replace.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rag_capg.errors import InputError


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only read here)
    os.umask(mask)
    return mask


def _give_ordinary_mode(tmp: Path, target: Path, *, folder: bool) -> None:
    """chmod ``tmp`` as if it had been created by open() / mkdir(), or to the mode of the ``target`` it replaces."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = (0o777 if folder else 0o666) & ~current_umask()
    os.chmod(tmp, mode)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    Works for anything that writes to a path (``torch.save``, ``plt.savefig``, ``df.to_csv``). The file ends
    with the mode ``open(target, "w")`` would give it (see the module docstring).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _give_ordinary_mode(tmp_path, target, folder=False)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; swap it into place if the block succeeds.

    An existing ``target`` is replaced only after the new directory is complete. The folder ends with the mode
    ``mkdir`` would give it; what the block writes inside follows the umask by itself.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        _give_ordinary_mode(tmp, target, folder=True)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def orphaned_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """The temporaries a killed ``atomic_path`` / ``atomic_dir`` left in ``folder`` for targets whose name
    starts with one of ``names`` (``.step-4.k2j3x``, ``.final.old``). Only the caller knows whether nobody else
    is writing there (rag_capg.training.run_folder removes them under the run folder's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(".") and any(p.name.startswith(f".{n}") for n in names))


# ------------------------------------------------------------------------------------------ reading
def read_text_lines(path: str | Path, *, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file; a BOM is dropped, CRLF is fine.

    Bad input is one InputError naming the file and the line: a folder where a file was expected, bytes that
    are not UTF-8 (with their column), or a NUL byte (a binary file). Lines are decoded one at a time, so
    the error comes with the line that holds the bad byte and a 5 GB file is never held in memory.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"is a folder; expected a {what}", file=path)
    if not path.is_file():
        raise InputError("file does not exist", file=path)
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            nul = raw.find(b"\0")
            if nul >= 0:
                raise InputError(f"a NUL byte at column {nul + 1}: a binary file, not a {what}", file=path,
                                 line=line_no)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"not UTF-8 text: byte 0x{raw[err.start]:02x} at column {err.start + 1} "
                                 "(re-save the file as UTF-8)", file=path, line=line_no) from None
            yield line_no, text.rstrip("\r\n")


def read_log_rows(path: str | Path) -> list[dict]:
    """The rows of a run log (metrics.jsonl, eval.jsonl): one JSON object per line, each with a "step". A torn
    last line (a run killed mid-write) is dropped; a bad line anywhere else is an InputError naming it. A
    missing file has no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in read_text_lines(path, what="run log") if line.strip()]
    rows = []
    for i, (line_no, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise InputError(f"not JSON: {err.msg}", file=path, line=line_no) from None
        if not isinstance(row, dict) or "step" not in row:
            raise InputError("a row needs a 'step'", file=path, line=line_no, field="step")
        rows.append(row)
    return rows


def read_text(path: str | Path, *, what: str = "file") -> str:
    """The whole text of a small UTF-8 file, with read_text_lines' errors (which name the line)."""
    return "\n".join(line for _, line in read_text_lines(path, what=what))


def check_writable(folder: str | Path, *, field: str) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it, so that an output or cache
    folder the user cannot write is one InputError before any model is loaded, not a traceback at the end."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(f"cannot write to this folder ({reason}); choose another {field} or fix its "
                         "permissions", file=folder, field=field) from None
