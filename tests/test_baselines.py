"""eval/baselines.py end to end on the tiny BEIR fixture: BM25, the four distillation / contrastive trainings
(tiny random base and teacher models) and the rag-capg eval table over them."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import load_eval_script


def test_oracle_groups_hold_a_relevant_passage_and_its_grades():
    driver = load_eval_script("baselines")
    queries = type("Q", (), {"ids": ["q1", "q2"], "qrels": {"q1": {"a": 2, "b": 1}, "q2": {"z": 1}}})()
    candidates = [["b", "c", "d", "e"], ["c", "d", "e", "f"]]
    config = driver.BaselinesConfig(dataset="unused", group_size=3, mine_depth=4)
    for qid, ids, labels in driver.oracle_groups(queries, candidates, config, random.Random(0)):
        assert len(ids) == len(set(ids)) == 3 and ids[0] in queries.qrels[qid]
        assert labels == [float(queries.qrels[qid].get(p, 0)) for p in ids]
    with pytest.raises(Exception, match="group_size"):
        driver.BaselinesConfig(dataset="unused", group_size=5, mine_depth=4)


@pytest.mark.slow
def test_driver_trains_every_baseline_and_writes_one_table(tmp_path, tiny_beir_dir, tiny_bi_encoder_path):
    pytest.importorskip("Stemmer")
    driver = load_eval_script("baselines")
    out = tmp_path / "out"
    argv = [f"dataset={tiny_beir_dir}", f"base_model={tiny_bi_encoder_path}", f"teacher_model={tiny_bi_encoder_path}",
            "mine_depth=5", "group_size=3", "batch_size=4", "k=20", "threads=1", f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={out}", f"extra_models=[{tiny_bi_encoder_path}]", "extra_names=[extra]"]
    assert driver.main(argv) == 0
    for method in driver.ALL_METHODS:
        record = json.loads((out / f"{method}.json").read_text())
        assert record["wall_time_s"] >= 0 and record["versions"]["sentence-transformers"]
        assert record["command"].startswith("python eval/baselines.py dataset=")
        if method in driver.TRAINED:
            assert record["optimizer_steps"] >= 1 and (out / "models" / method / "modules.json").is_file()
    report = json.loads((out / "eval" / "results.json").read_text())
    assert [m["name"] for m in report["models"]] == ["zeroshot", "bm25", *driver.TRAINED, "extra"]
    assert report["command"] == (out / "eval_command.txt").read_text().strip()
    # A fixture query shares its topic's words with the topic's 3 passages (its relevant ones among them) and
    # no word with any other passage: BM25 puts those 3 on top, in some order.
    bm25 = report["models"][1]["first_stage"]["mean"]
    assert bm25["recall@10"] == 1.0 and bm25["mrr@10"] >= 1 / 3
