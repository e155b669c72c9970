"""What every late-stage ranker (LSR) is: the ``Judge`` protocol, a call with a timeout, and the two judges
that need no model (the relevance-label oracle and a wrapped Python callable).

A judge has ``identity: str`` (stable across runs; the score cache's key) and
``score(query_ids, queries, passage_ids, passages) -> FloatTensor (B, K)``, queries (B) and passages (B x K).
Scores must be pointwise: a pair's score may not depend on which other passages share its row, because
the score cache (rag_capg.judges.cache) stores pairs and sends only the pairs it lacks, as rows of one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from rag_capg.errors import JudgeError  # defined with InputError; rag_capg.judges re-exports it


@runtime_checkable
class Judge(Protocol):
    """A frozen late-stage ranker: ``identity`` keys its cached scores; ``score`` rates (query, passage) pairs."""

    identity: str

    def score(self, query_ids: list[str], queries: list[str], passage_ids: list[list[str]],
              passages: list[list[str]]) -> torch.Tensor: ...


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_name(name_or_path: str | Path) -> str:
    """A local path is identified by its absolute form (stable whatever the cwd); a Hub id as is."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else str(name_or_path)


def pairs(queries: list[str], passages: list[list[str]]) -> list[tuple[str, str]]:
    return [(q, p) for q, row in zip(queries, passages) for p in row]


class LabelOracle:
    """Graded qrels as the judge: score = grade, 0 for unjudged pairs (qrels: qid -> {pid: grade})."""

    def __init__(self, qrels: dict[str, dict[str, int]]):
        self.qrels = qrels
        self.identity = f"LabelOracle:{short_hash(json.dumps(qrels, sort_keys=True))}"

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        return torch.tensor([[float(self.qrels.get(q, {}).get(p, 0)) for p in row]
                             for q, row in zip(query_ids, passage_ids)], dtype=torch.float32)


class CallableJudge:
    """Any fn(query_ids, queries, passage_ids, passages) -> array-like (B, K); ``identity`` is yours
    to keep stable (it keys the cache). ``timeout`` (seconds) bounds each call and raises JudgeError
    (see ``call_with_timeout``).

    The callable contract: scores are pointwise. The score of (query, passage) must depend on that pair
    only, never on the other passages of its row, because the score cache stores pairs and calls ``fn``
    with only the pairs it lacks, each as a row of one pair (B' x 1: ``passage_ids == [[p1], [p2], ...]``).
    So do not normalise within a row: a z-score over a row of one is 0 / 0 = NaN (the cache's error says
    so), a softmax over it is always 1. To put a score on a per-query scale, use statistics that do not
    depend on the list: over the whole corpus for that query, or over a fixed, seeded sample of passages
    (what ``lsr=ensemble`` does for its members; rag_capg.judges.ensemble).

    Example:
        >>> def overlap(query_ids, queries, passage_ids, passages):  # words shared by query and passage
        ...     return [[len(set(q.split()) & set(p.split())) for p in row] for q, row in zip(queries, passages)]
        >>> judge = CallableJudge(overlap, identity="overlap-v1")
    """

    def __init__(self, fn: Callable, identity: str, *, timeout: float | None = None):
        self.fn, self.identity, self.timeout = fn, identity, timeout

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        if self.timeout is None:
            return torch.as_tensor(self.fn(query_ids, queries, passage_ids, passages), dtype=torch.float32)
        out = call_with_timeout(self.fn, (query_ids, queries, passage_ids, passages), self.timeout,
                                what=f"judge {self.identity!r}")
        return torch.as_tensor(out, dtype=torch.float32)


def call_with_timeout(fn: Callable, args: tuple, timeout: float, *, what: str):
    """``fn(*args)``, or JudgeError after ``timeout`` seconds.

    Python cannot kill a thread, so a call that overruns is abandoned, still running, in a *daemon* thread:
    one that never returns costs a thread, not the run, and does not keep the process from exiting (a
    ThreadPoolExecutor's workers are joined at exit, which turned a hung judge into a hung process)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="rag-capg-judge-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise JudgeError(f"{what} timed out after {timeout} s (lsr_timeout)")
    if "error" in result:
        raise result["error"]
    return result["value"]
