"""ScoreCache: a frozen judge's scores on disk, keyed by (judge identity, query id, passage id), and the
failure policy (an exception, a timeout, NaN/inf or a wrong shape is a JudgeError, or with "skip_query" the
query is skipped and counted: never a silent zero reward)."""

from __future__ import annotations

import math
import os
import sqlite3
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import torch

from rag_capg.errors import InputError
from rag_capg.judges.base import CallableJudge, JudgeError

FailurePolicy = Literal["error", "skip_query"]


class _Corrupt(Exception):
    """The file at a ScoreCache's path is not a sound score cache."""


# Rollback journal, not WAL: WAL needs memory shared by the processes (one host: a cache_dir on a network
# filesystem shared by several nodes breaks it), and with 8 processes reading and writing all the time its
# checkpoints never caught up (the WAL reached 85 MiB beside a 19 MiB database; eval/bench_score_cache.py).
# TRUNCATE empties the journal after each commit rather than deleting it; a writer waits for the others'
# locks up to the connection's busy timeout.
JOURNAL_MODE = "TRUNCATE"


def set_journal_mode(db: sqlite3.Connection, mode: str, *, wait: float = 10.0) -> str:
    """Switch ``db`` to journal ``mode``; returns the mode in force. Leaving WAL (a file an older version
    wrote) needs every other connection closed; while another process still holds the file open that way,
    retry for ``wait`` seconds, then carry on in the file's mode (WAL still works on one host) with a warning."""
    deadline = time.monotonic() + wait
    while True:
        try:
            got = db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            got = None
        if got is not None and got.lower() == mode.lower():
            return got.lower()
        if time.monotonic() > deadline:
            current = db.execute("PRAGMA journal_mode").fetchone()[0].lower()
            warnings.warn(f"LSR score cache: could not switch journal_mode {current} -> {mode.lower()} (another "
                          f"process holds the file open); continuing in {current}", stacklevel=3)
            return current
        time.sleep(0.05)


class ScoreCache:
    """On-disk scores of a frozen judge, keyed by (judge identity, query id, passage id), plus the
    failure policy. ``path=None`` keeps the cache in memory (policy only).

    Only misses go to the judge, flattened into rows of one pair (B' x 1) so any mix of hits and
    misses batches fully. A failing call is an error under "error"; under "skip_query" the misses
    are re-sent one query at a time to find the culprits, and a query whose call raises, times out
    or gives a non-finite score is skipped: its row is NaN in score() and True in the mask of
    score_with_skips(), and stats()["skipped_queries"] counts it. Nothing invalid is ever cached, and a
    stored score that is not a finite number is a miss. sqlite with a rollback journal lets several training
    processes, on one node or several (a cache_dir on a shared filesystem with working POSIX locks), share
    one file; a file that is not a sound cache when opened is moved aside and rebuilt.
    """

    def __init__(self, judge, path: str | Path | None, *, on_failure: FailurePolicy = "error",
                 timeout: float | None = None):
        if on_failure not in ("error", "skip_query"):
            raise ValueError(f"on_failure must be 'error' or 'skip_query', got {on_failure!r}")
        self.judge, self.identity, self.on_failure, self.timeout = judge, judge.identity, on_failure, timeout
        self.path = None if path is None else Path(path)
        self.db = self._open()
        self.hits = self.misses = self.judge_calls = self.skipped_queries = 0

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=60)
        try:
            if self.path is not None:
                set_journal_mode(db, JOURNAL_MODE)
            db.execute("CREATE TABLE IF NOT EXISTS scores (judge TEXT, qid TEXT, pid TEXT, score REAL, "
                       "PRIMARY KEY (judge, qid, pid)) WITHOUT ROWID")
            db.commit()
            # A torn or overwritten file opens fine and fails on some later page: read every page now.
            # (O(file size), about a second per few hundred MB, once per run.)
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            columns = [row[1] for row in db.execute("PRAGMA table_info(scores)")]
        except sqlite3.DatabaseError as err:
            db.close()
            raise _Corrupt(str(err)) from None
        if problems != ["ok"] or columns != ["judge", "qid", "pid", "score"]:
            db.close()
            raise _Corrupt(problems[0] if problems != ["ok"] else f"unexpected columns {columns}")
        return db

    def _open(self) -> sqlite3.Connection:
        """Open (or create) the cache; a file that is not a sound score cache is moved aside and rebuilt: it
        only holds scores the judge can recompute. Named in one line on stderr."""
        if self.path is None:
            return self._connect()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        inode = self.path.stat().st_ino if self.path.exists() else None
        try:
            return self._connect()
        except _Corrupt as err:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{os.getpid()}")
            # Move it only if it is still the file we found (another process may have rebuilt it already).
            if inode is not None and self.path.exists() and self.path.stat().st_ino == inode:
                os.replace(self.path, aside)
                for extra in ("-wal", "-shm", "-journal"):  # its journal belongs to it, not to the new file
                    stale = self.path.with_name(self.path.name + extra)
                    if stale.exists():
                        os.replace(stale, aside.with_name(aside.name + extra))
            print(f"rag-capg: the score cache {self.path} was unreadable ({err}); moved it to {aside.name} and "
                  "started a new one (its scores are recomputed)", file=sys.stderr, flush=True)
        try:
            return self._connect()
        except _Corrupt as err:
            raise InputError(f"score cache unreadable ({err}); delete it (it is a cache)", file=self.path) from None

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "judge_calls": self.judge_calls, "skipped_queries": self.skipped_queries}

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        return self.score_with_skips(query_ids, queries, passage_ids, passages)[0]

    def score_with_skips(self, query_ids, queries, passage_ids, passages) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, K), skipped (B,) bool). Skipped rows are NaN, so misuse fails loudly downstream."""
        b, k = len(query_ids), len(passage_ids[0]) if passage_ids else 0
        if any(len(row) != k for row in passage_ids) or len(passages) != b or len(queries) != b:
            raise ValueError("ScoreCache: queries, passage_ids and passages must be B and B x K")
        out = torch.full((b, k), math.nan)
        known: dict[tuple[str, str], float] = {}
        try:
            for q in set(query_ids):
                for pid, s in self.db.execute("SELECT pid, score FROM scores WHERE judge=? AND qid=?",
                                              (self.identity, q)):
                    # sqlite stores NaN as NULL; a hand-edited file may hold text. Neither is a score: a miss.
                    if isinstance(s, (int, float)) and math.isfinite(s):
                        known[(q, pid)] = float(s)
        except sqlite3.DatabaseError as err:  # damaged after it was opened (by another process, a full disk)
            raise InputError(f"score cache unreadable ({err}); delete it (it is a cache) and rerun",
                             file=self.path) from None
        miss: list[tuple[int, int]] = []
        for i, (q, row) in enumerate(zip(query_ids, passage_ids)):
            for j, pid in enumerate(row):
                if (q, pid) in known:
                    out[i, j] = known[(q, pid)]
                else:
                    miss.append((i, j))
        self.hits += b * k - len(miss)
        self.misses += len(miss)
        skipped = torch.zeros(b, dtype=torch.bool)
        if miss:
            try:
                got = self._call(miss, query_ids, queries, passage_ids, passages)
            except JudgeError:
                if self.on_failure == "error":
                    raise
                got = {}
                for i in sorted({i for i, _ in miss}):  # isolate the failing queries
                    part = [(i2, j) for i2, j in miss if i2 == i]
                    try:
                        got.update(self._call(part, query_ids, queries, passage_ids, passages))
                    except JudgeError:
                        skipped[i] = True
            bad = {i for (i, _), s in got.items() if not math.isfinite(s)}
            if bad and self.on_failure == "error":
                raise JudgeError(f"judge {self.identity!r} returned NaN/inf for query id(s) "
                                 f"{sorted({query_ids[i] for i in bad})}. The cache sends only the pairs it "
                                 "lacks, each as a row of one pair (B' x 1): a judge that normalises within a row "
                                 "(a z-score or min-max over the row's passages) divides by a zero spread "
                                 "there and returns NaN. Score each pair on its own (README, 'The callable "
                                 "contract')")
            skipped[list(bad)] = True
            rows = []
            for (i, j), s in got.items():
                if not skipped[i]:
                    out[i, j] = s
                    rows.append((self.identity, query_ids[i], passage_ids[i][j], s))
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            self.db.commit()
        out[skipped] = math.nan
        self.skipped_queries += int(skipped.sum())
        return out, skipped

    def _call(self, pairs, query_ids, queries, passage_ids, passages) -> dict[tuple[int, int], float]:
        """Send ``pairs`` (row, col) as a (len(pairs), 1) batch; any exception/timeout/shape -> JudgeError."""
        args = ([query_ids[i] for i, _ in pairs], [queries[i] for i, _ in pairs],
                [[passage_ids[i][j]] for i, j in pairs], [[passages[i][j]] for i, j in pairs])
        self.judge_calls += 1
        try:
            if self.timeout is None:
                res = self.judge.score(*args)
            else:
                res = CallableJudge(self.judge.score, self.identity, timeout=self.timeout).score(*args)
            res = torch.as_tensor(res, dtype=torch.float32)
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(f"judge {self.identity!r} raised {type(exc).__name__}: {exc}") from exc
        if tuple(res.shape) != (len(pairs), 1):
            raise JudgeError(f"judge {self.identity!r} returned shape {tuple(res.shape)}, expected ({len(pairs)}, 1)")
        return {p: float(s) for p, s in zip(pairs, res[:, 0].tolist())}


