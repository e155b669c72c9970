"""The LSR score cache under many writers: P processes share one sqlite file, as P training processes
share cache_dir/lsr, each scoring a stream of (query, passage) rows through ScoreCache.

Each process runs `--steps` calls of B*G rows x K candidates (query ids drawn from `--queries`, passage ids
from `--passages`, so later calls hit more and more), with a judge that returns random scores at once (the
cache, not the judge, is what is timed). The parent polls the database, its journal and its WAL (every
10 ms) and reports their largest sizes, the final database size and the wall time.

    python eval/bench_score_cache.py [--processes 8] [--steps 300] [--journal-mode truncate|wal]

``--journal-mode wal`` runs the cache in the WAL mode it used before.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import torch


class RandomJudge:
    identity = "bench-random"

    def score(self, query_ids, queries, passage_ids, passages):
        return torch.rand(len(query_ids), len(passage_ids[0]))


def writer(path: str, rank: int, args) -> None:
    from rag_capg.judges import cache as cache_module

    cache_module.JOURNAL_MODE = args.journal_mode.upper()  # "wal": the connection setup the cache had before
    cache = cache_module.ScoreCache(RandomJudge(), path)
    rng = random.Random(rank)
    for _ in range(args.steps):
        qids = [f"q{rng.randrange(args.queries)}" for _ in range(args.rows)]
        pids = [[f"d{rng.randrange(args.passages)}" for _ in range(args.k)] for _ in qids]
        cache.score(qids, ["query"] * len(qids), pids, [["passage"] * args.k for _ in qids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=16, help="B*G rows per call")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--queries", type=int, default=800)
    ap.add_argument("--passages", type=int, default=5183)
    ap.add_argument("--journal-mode", choices=["truncate", "wal"], default="truncate")
    ap.add_argument("--dir", default=None, help="where the database goes (default: a temporary folder)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_cache_"))
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"cache-{args.journal_mode}.sqlite"
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=writer, args=(str(path), r, args)) for r in range(args.processes)]
    t0 = time.time()
    for p in procs:
        p.start()
    peak = {"db": 0, "wal": 0, "journal": 0}
    while any(p.is_alive() for p in procs):
        for key, suffix in (("db", ""), ("wal", "-wal"), ("journal", "-journal")):
            try:
                peak[key] = max(peak[key], os.path.getsize(f"{path}{suffix}"))
            except OSError:
                pass
        time.sleep(0.01)
    wall = time.time() - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM scores").fetchone()[0]
    left = {s: os.path.getsize(f"{path}{s}") for s in ("-wal", "-journal") if os.path.exists(f"{path}{s}")}
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"journal_mode={args.journal_mode} processes={args.processes} steps={args.steps} rows/call="
          f"{args.rows}x{args.k}: {rows} pairs cached, {wall:.1f} s; database {mib(os.path.getsize(path))} "
          f"(peak {mib(peak['db'])}), peak WAL {mib(peak['wal'])}, peak rollback journal {mib(peak['journal'])}, "
          f"left after exit: {({k: mib(v) for k, v in left.items()}) or 'nothing'}")


if __name__ == "__main__":
    main()
