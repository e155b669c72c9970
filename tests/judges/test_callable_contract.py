"""The callable contract (README, CallableJudge): a callable gets only the pairs the cache lacks, as rows of one
pair, and one that normalises within its rows (NaN on a row of one) is told so."""

from __future__ import annotations

import numpy as np
import pytest

from rag_capg.judges import CallableJudge, JudgeError, ScoreCache


def test_the_callable_receives_only_missing_pairs_as_rows_of_one():
    calls = []

    def length(query_ids, queries, passage_ids, passages):
        calls.append(passage_ids)
        return [[float(len(p)) for p in row] for row in passages]

    cache = ScoreCache(CallableJudge(length, "length"), None)
    cache.score(["q1", "q2"], ["a", "b"], [["x", "y"], ["x", "z"]], [["xx", "yyy"], ["xx", "z"]])
    cache.score(["q1"], ["a"], [["y", "w", "x"]], [["yyy", "wwww", "xx"]])
    assert calls == [[["x"], ["y"], ["x"], ["z"]], [["w"]]]


def test_a_callable_normalising_within_its_rows_gets_a_message_that_says_so():
    def z_within_row(query_ids, queries, passage_ids, passages):  # the mistake: statistics of the row itself
        s = np.array([[float(len(p)) for p in row] for row in passages])
        with np.errstate(invalid="ignore"):
            return (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True)

    with pytest.raises(JudgeError, match=r"normalises within a row.*zero spread.*The callable contract"):
        ScoreCache(CallableJudge(z_within_row, "z"), None).score(["q"], ["a"], [["x", "y"]], [["xx", "yyy"]])
