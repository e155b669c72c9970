"""eval/bench_collections.py: the phases that keep tuning off the test split (both benchmarks load their
collections through it)."""

from __future__ import annotations

from tests.conftest import load_eval_script


def _bench(tmp_path, monkeypatch, tiny_beir_dir):
    bench = load_eval_script("bench_collections")
    (tmp_path / "scifact").symlink_to(tiny_beir_dir)
    monkeypatch.setattr(bench, "DATA", tmp_path)
    return bench


def test_dev_phase_tunes_on_held_out_train_queries_disjoint_from_training(tmp_path, monkeypatch, tiny_beir_dir):
    bench = _bench(tmp_path, monkeypatch, tiny_beir_dir)
    _, all_train, test = bench.load_collection("scifact", "test")
    _, train, tune = bench.load_collection("scifact", "dev")
    assert set(train.ids).isdisjoint(tune.ids) and not set(tune.ids) & set(test.ids)
    assert sorted(train.ids + tune.ids) == sorted(all_train.ids)
    assert len(tune) == round(0.2 * len(all_train)) and tune.split == "tune"
    assert all(tune.qrels[q] == all_train.qrels[q] for q in tune.ids)  # scored with its labels
    assert bench.load_collection("scifact", "dev")[2].ids == tune.ids  # seeded: every call the same


def test_subsample_tunes_on_train_queries_outside_it(tmp_path, monkeypatch, tiny_beir_dir):
    bench = _bench(tmp_path, monkeypatch, tiny_beir_dir)
    _, all_train, _ = bench.load_collection("scifact", "test")
    _, sub, test = bench.load_collection("scifact-5", "test")
    _, sub_dev, tune = bench.load_collection("scifact-5", "dev")
    assert len(sub) == 5 and set(sub.ids) <= set(all_train.ids) and test.split == "test"
    assert sub_dev.ids == sub.ids  # the dev phase trains on the same subsample
    assert set(tune.ids).isdisjoint(sub.ids) and sorted(sub.ids + tune.ids) == sorted(all_train.ids)
