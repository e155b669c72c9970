"""rag_capg.evaluation.trec: a written run reads back bit for bit, in trec_eval's order; bad lines name the file
and the line."""

from __future__ import annotations

import pytest

from rag_capg.errors import InputError
from rag_capg.evaluation.metrics import evaluate_run, rank_documents
from rag_capg.evaluation.trec import read_trec_run, trec_lines


def test_round_trip_keeps_scores_exact_and_order(tmp_path):
    # Scores 1e-9 apart: printed to 6 decimals they would tie, and trec_eval would reorder them by doc id.
    run = {"q1": {"a": 0.5, "b": 0.5 + 1e-9, "c": 0.25, "d": 0.5 + 2e-9}, "q2": {"x": 1.0, "y": 1.0}}
    path = tmp_path / "run.trec"
    path.write_text(trec_lines(run, "tag"))
    back = read_trec_run(path)
    assert back == run
    lines = path.read_text().splitlines()
    assert [line.split()[2] for line in lines[:4]] == rank_documents(run["q1"]) == ["d", "b", "a", "c"]
    assert [line.split()[3] for line in lines[:4]] == ["1", "2", "3", "4"]
    qrels = {"q1": {"a": 1}, "q2": {"x": 1}}
    expected = {"mrr@10": (1 / 3 + 1 / 2) / 2}
    assert evaluate_run(back, qrels, ["mrr@10"]) == evaluate_run(run, qrels, ["mrr@10"]) == expected


@pytest.mark.parametrize("text, needle", [
    ("q1 Q0 d1 1 0.5\n", "run.trec:1"),
    ("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 2 high t\n", "run.trec:2"),
    ("\n\n", "empty run file"),
])
def test_bad_run_files_name_the_line(tmp_path, text, needle):
    path = tmp_path / "run.trec"
    path.write_text(text)
    with pytest.raises(InputError, match=needle):
        read_trec_run(path)
