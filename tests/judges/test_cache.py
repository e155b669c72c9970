"""The score cache's sqlite file: a rollback journal (no WAL to grow, nothing that needs shared memory), a
WAL file left by an older version switched over, and several writers at once losing nothing."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch

from rag_capg.judges.cache import ScoreCache, set_journal_mode


class Length:
    identity = "length"

    def score(self, query_ids, queries, passage_ids, passages):
        return torch.tensor([[float(len(p)) for p in row] for row in passages])


def mode(db) -> str:
    """The journal mode a connection uses; a fresh connection to a file reports "wal" only if the file is
    in WAL mode (that one is stored in the file; the rollback modes are per connection)."""
    db = sqlite3.connect(db) if not isinstance(db, sqlite3.Connection) else db
    return db.execute("PRAGMA journal_mode").fetchone()[0].lower()


def test_a_new_cache_uses_a_rollback_journal_and_leaves_no_wal(tmp_path):
    path = tmp_path / "lsr.sqlite"
    cache = ScoreCache(Length(), path)
    cache.score(["q"], ["query"], [["a", "b"]], [["x", "yy"]])
    assert mode(cache.db) == "truncate" and mode(path) != "wal"
    assert not (tmp_path / "lsr.sqlite-wal").exists() and not (tmp_path / "lsr.sqlite-shm").exists()


def test_a_wal_file_from_an_older_version_is_switched_or_still_served(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    assert old.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    old.execute("CREATE TABLE scores (judge TEXT, qid TEXT, pid TEXT, score REAL, PRIMARY KEY (judge, qid, pid)) "
                "WITHOUT ROWID")
    old.execute("INSERT INTO scores VALUES ('length', 'q', 'a', 7.0)")
    old.commit()
    # another process still reading it the old way: the switch cannot happen; the cache warns and works
    old.execute("BEGIN")
    old.execute("SELECT * FROM scores").fetchall()
    db = sqlite3.connect(path, timeout=1)
    with pytest.warns(UserWarning, match="journal_mode wal"):
        assert set_journal_mode(db, "TRUNCATE", wait=0.2) == "wal"
    db.close()
    old.rollback()
    old.close()
    # once nobody holds it, a new cache switches the file over and keeps its rows
    cache = ScoreCache(Length(), path)
    assert mode(cache.db) == "truncate" and mode(path) != "wal" and not (tmp_path / "old.sqlite-wal").exists()
    assert torch.equal(cache.score(["q"], ["query"], [["a", "b"]], [["x", "yy"]]), torch.tensor([[7.0, 2.0]]))
    assert cache.stats()["hits"] == 1


def test_several_writers_at_once_lose_nothing(tmp_path):
    # Four connections (as four training processes would hold) write overlapping pairs concurrently.
    path = tmp_path / "shared.sqlite"
    errors: list[BaseException] = []

    def worker(rank: int):
        try:
            cache = ScoreCache(Length(), path)
            for step in range(25):
                qids = [f"q{(rank + step + i) % 7}" for i in range(4)]
                pids = [[f"d{(step * 3 + j + i) % 40}" for j in range(5)] for i in range(4)]
                got = cache.score(qids, ["query"] * 4, pids, [[p * 2 for p in row] for row in pids])
                assert torch.equal(got, torch.tensor([[float(len(p) * 2) for p in row] for row in pids]))
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = {(f"q{(r + s + i) % 7}", f"d{(s * 3 + j + i) % 40}") for r in range(4) for s in range(25)
                for i in range(4) for j in range(5)}
    rows = set(sqlite3.connect(path).execute("SELECT qid, pid FROM scores").fetchall())
    assert rows == expected and mode(path) != "wal"
