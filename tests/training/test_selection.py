"""Choosing the model to ship: the dev hold-out (disjoint from training, the same in every process and on
resume), the judge's pseudo-labels without qrels, and a run that never beats its start shipping the start."""

from __future__ import annotations

import copy
import json
import random
import statistics
from pathlib import Path

import torch

from rag_capg.retrieval.data import QuerySet, load_corpus, load_queries
from rag_capg.retrieval.retriever import shippable
from rag_capg.training.selection import judge_pseudo_qrels, shipped_step, split_dev
from tests.training.test_trainer import config, max_diff, train, weights


def test_dev_split_is_disjoint_seeded_and_independent_of_order():
    qs = QuerySet(ids=[f"q{i}" for i in range(50)], texts=[f"t{i}" for i in range(50)],
                  qrels={f"q{i}": {"d": 1} for i in range(50)}, split="train")
    train_part, dev = split_dev(qs, 0.2, max_queries=None, seed=3)
    assert len(dev) == 10 and len(train_part) == 40
    assert set(dev.ids).isdisjoint(train_part.ids) and set(dev.ids) | set(train_part.ids) == set(qs.ids)
    assert dev.split == "dev" and all(dev.qrels[q] == {"d": 1} for q in dev.ids)
    # a query's side depends on (seed, id) only: shuffled input, the same dev queries
    order = list(range(50))
    random.Random(0).shuffle(order)
    _, dev_shuffled = split_dev(qs.subset(order), 0.2, max_queries=None, seed=3)
    assert set(dev_shuffled.ids) == set(dev.ids)
    assert set(split_dev(qs, 0.2, max_queries=None, seed=4)[1].ids) != set(dev.ids)  # another seed, another split
    assert len(split_dev(qs, 0.2, max_queries=6, seed=3)[1]) == 6
    assert split_dev(qs.head(20), 0.2, max_queries=None, seed=3)[1] is None  # 4 < 5 dev queries: no hold-out


def test_judge_pseudo_qrels_are_the_judges_top_of_the_pool(tiny_beir_dir):
    corpus = load_corpus(str(tiny_beir_dir))
    dev = load_queries(str(tiny_beir_dir), "test", corpus)
    pool = {q: {d: 1.0 for d in corpus.ids[:12]} for q in dev.ids}
    score_of = {d: float((7 * i) % 12) for i, d in enumerate(corpus.ids)}

    class Judge:
        identity = "j"

        def score(self, query_ids, queries, passage_ids, passages):
            return torch.tensor([[score_of[d] for d in row] for row in passage_ids])

    qrels = judge_pseudo_qrels(dev, pool, corpus, Judge(), num_relevant=3)
    best = sorted(corpus.ids[:12], key=score_of.get, reverse=True)[:3]  # brute force
    assert all(qrels[q] == {best[0]: 3, best[1]: 2, best[2]: 1} for q in dev.ids)


def anti_judge(query_ids, queries, passage_ids, passages):
    """Rewards passages that share NO word with the query: training on it makes retrieval worse."""
    return [[float(not set(q.lower().split()) & set(p.lower().split())) for p in row]
            for q, row in zip(queries, passages)]


def test_a_run_that_never_beats_its_start_ships_the_start(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, capsys):
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, dev_fraction=0.5, max_steps=6, eval_every=2,
                 learning_rate=2e-2, lsr="callable", lsr_callable="tests.training.test_selection:anti_judge",
                 eval_split="", dev_max_queries=None)
    summary = train(cfg)
    run = Path(cfg["output_dir"])
    sel = summary["selection"]
    assert sel["dev_queries"] == 6 and sel["dev_labels"] == "qrels" and summary["train_queries"] == 6
    assert sel["shipped_step"] == 0 and sel["improved"] is False
    assert "never beat the starting model" in capsys.readouterr().out
    assert "never beat the starting model" in json.loads((run / "run_summary.json").read_text())["message"]
    dev_rows = [json.loads(r) for r in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dev_rows if r["split"] == "dev"] == [0, 2, 4, 6]
    assert max(r["ndcg@10"] for r in dev_rows if r["step"] > 0) < dev_rows[0]["ndcg@10"]  # it really got worse
    # final/ is the starting model: its query tower is the base encoder, bit for bit
    base = {k.split("/", 1)[1]: v for k, v in weights(tiny_bi_encoder_path).items()}
    final = weights(run / "final")
    assert all(torch.equal(v, base[k.split("/", 1)[1]]) for k, v in final.items())
    assert not (run / "best").exists()  # one folder to ship
    assert json.loads((run / "best.json").read_text())["step"] == 0  # and best.json says it is the start


def test_without_labels_the_dev_queries_are_labelled_by_the_judge(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    from rag_capg import CAPGConfig, CAPGTrainer
    from tests.training.test_trainer import counting_judge

    corpus = load_corpus(str(tiny_beir_dir))
    labelled = load_queries(str(tiny_beir_dir), "train", corpus)
    unlabelled = dict(zip(labelled.ids, labelled.texts))  # the same queries, no qrels
    args = CAPGConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), candidates=5,
                      batch_size=4, max_steps=3, eval_every=1, learning_rate=1e-3, report_to="none", progress=False,
                      dev_fraction=0.5, dev_max_queries=None, dev_judge_top=2)
    summary = CAPGTrainer(model=str(tiny_bi_encoder_path), judge=counting_judge, args=args, corpus=corpus,
                          train_dataset=unlabelled).train()
    assert summary["selection"]["dev_labels"] == "judge"
    qrels = json.loads((tmp_path / "run" / "dev_qrels.json").read_text())
    dev_ids = split_dev(labelled, 0.5, max_queries=None, seed=0)[1].ids
    assert sorted(qrels) == sorted(dev_ids) and all(sorted(g.values()) == [1, 2] for g in qrels.values())
    # the pseudo-relevant passages are the judge's (word overlap) top 2 among the starting model's top 10
    text_of, q = dict(zip(corpus.ids, corpus.texts)), dev_ids[0]
    overlap = counting_judge([q], [unlabelled[q]], [list(qrels[q])], [[text_of[d] for d in qrels[q]]])[0]
    assert min(overlap) >= 1  # the tiny corpus has overlapping passages for every query
    # dev_judge_depth = the whole corpus: the labels are the judge's top 2 of all 30 passages (brute force)
    deep = CAPGConfig(**{**args.__dict__, "output_dir": str(tmp_path / "deep"), "dev_judge_depth": len(corpus)})
    CAPGTrainer(model=str(tiny_bi_encoder_path), judge=counting_judge, args=deep, corpus=corpus,
                train_dataset=unlabelled).train()
    deep_qrels = json.loads((tmp_path / "deep" / "dev_qrels.json").read_text())
    for q in dev_ids:
        scores = counting_judge([q], [unlabelled[q]], [corpus.ids], [corpus.texts])[0]
        best = sorted(range(len(scores)), key=lambda j: -scores[j])
        assert min(scores[corpus.index_of[d]] for d in deep_qrels[q]) == scores[best[1]]  # ties: any of them


def test_the_best_checkpoint_ships_only_if_its_dev_gain_is_significant():
    from rag_capg.evaluation.metrics import paired_test

    rng = random.Random(0)
    start = {f"q{i}": rng.random() for i in range(40)}
    clear = {q: v + 0.2 for q, v in start.items()}  # every dev query better
    noisy = {q: v + (0.31 if i % 2 else -0.3) for i, (q, v) in enumerate(start.items())}  # better on the mean
    assert statistics.mean(noisy.values()) > statistics.mean(start.values())
    step, p = shipped_step(120, start, clear, alpha=0.1)
    assert step == 120 and p == paired_test(start, clear) < 0.001
    step, p = shipped_step(120, start, noisy, alpha=0.1)
    assert step == 0 and p == paired_test(start, noisy) >= 0.1
    assert shipped_step(120, start, noisy, alpha=1.0)[0] == 120  # alpha 1: the best on dev, whatever its margin
    assert shipped_step(0, start, start, alpha=1.0) == (0, 1.0)  # the start was the best


def variant_two_judge(query_ids, queries, passage_ids, passages):
    """Word overlap, plus a bonus for 'variant 2' passages: a preference the starting model does not share and
    the query tower can learn (one direction added to every query)."""
    return [[len(set(q.lower().split()) & set(p.lower().split())) + 3.0 * ("variant 2" in p) for p in row]
            for q, row in zip(queries, passages)]


def test_a_checkpoint_chosen_on_judge_agreement_ships_with_a_warning(tmp_path, tiny_bi_encoder_path, tiny_beir_dir,
                                                                       capsys):
    from rag_capg import CAPGConfig, CAPGTrainer

    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    args = CAPGConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), candidates=5,
                      batch_size=6, max_steps=8, eval_every=2, learning_rate=5e-3, report_to="none", progress=False,
                      dev_fraction=0.5, dev_max_queries=None, dev_judge_top=1, dev_alpha=1.0)
    summary = CAPGTrainer(model=str(tiny_bi_encoder_path), judge=variant_two_judge, args=args, corpus=corpus,
                          train_dataset=dict(zip(queries.ids, queries.texts))).train()
    sel = summary["selection"]
    assert sel["dev_labels"] == "judge" and sel["shipped_step"] > 0 and sel["dev_best"] > sel["dev_start"]
    # agreement with the judge chose it: the run says that this is not the same as ranking better
    assert "chosen without labels" in summary["message"] and "chosen without labels" in capsys.readouterr().out


def test_refit_is_the_same_run_on_all_queries_for_the_chosen_length(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # after a run whose dev half chose step 2, the refit must equal an independent run from the start on all 12
    # queries (the dev ones with their labels: the oracle is rebuilt on all of them) for twice as many steps
    from rag_capg.cli.train import GROUPS, build_trainer
    from rag_capg.config_parsing import config_from_dict
    from rag_capg.training.selection import refit

    common = dict(learning_rate=5e-3, batch_size=3, lsr="label_oracle", eval_split="test")
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, dev_fraction=0.5, dev_max_queries=None, max_steps=4,
                 refit=False, **common)
    trainer = build_trainer(*config_from_dict(GROUPS, cfg))
    trainer.train()
    trainer.model = copy.deepcopy(trainer.model)  # as when final/ is best/ reloaded: the refit must not start there
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.1)
    after, info = refit(trainer, 2)
    assert info["steps"] == 4 and info["train_queries"] == 12 and info["from_step"] == 2
    second = tmp_path / "run" / "refit"  # the second run's logs; its model is the outer run's final/
    assert not (second / "final").exists() and (second / "metrics.jsonl").is_file()
    alone = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, dev_fraction=0.0, max_steps=4,
                   output_dir=str(tmp_path / "alone"), **common)
    expected = train(alone)
    shippable(trainer.model).save(str(tmp_path / "ours"))
    assert max_diff(weights(tmp_path / "ours"), weights(tmp_path / "alone" / "final")) < 1e-6
    assert after["ndcg@10"] == expected["eval_after"]["ndcg@10"]


def test_a_run_whose_checkpoint_passes_the_gate_ships_its_refit(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, capsys):
    from rag_capg import CAPGConfig, CAPGTrainer

    corpus = load_corpus(str(tiny_beir_dir))
    queries = load_queries(str(tiny_beir_dir), "train", corpus)
    unlabelled = dict(zip(queries.ids, queries.texts))
    args = CAPGConfig(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), candidates=5,
                      batch_size=6, max_steps=8, eval_every=2, learning_rate=5e-3, report_to="none", progress=False,
                      dev_fraction=0.5, dev_max_queries=None, dev_judge_top=1, dev_alpha=1.0)
    summary = CAPGTrainer(model=str(tiny_bi_encoder_path), judge=variant_two_judge, args=args, corpus=corpus,
                          train_dataset=unlabelled).train()
    sel, info = summary["selection"], summary["refit"]
    assert sel["shipped_step"] > 0 and info["steps"] == 2 * sel["shipped_step"] and info["train_queries"] == 12
    assert "retrained on all 12 training queries" in summary["message"]
    # the same judge on all the queries, from the start, for that many steps: the same weights
    alone = CAPGConfig(**{**args.__dict__, "output_dir": str(tmp_path / "alone"), "dev_fraction": 0.0,
                          "max_steps": info["steps"]})
    CAPGTrainer(model=str(tiny_bi_encoder_path), judge=variant_two_judge, args=alone, corpus=corpus,
                train_dataset=unlabelled).train()
    assert max_diff(weights(tmp_path / "run" / "final"), weights(tmp_path / "alone" / "final")) < 1e-6
    kept_args = CAPGConfig(**{**args.__dict__, "output_dir": str(tmp_path / "kept"), "refit": False})
    kept = CAPGTrainer(model=str(tiny_bi_encoder_path), judge=variant_two_judge, corpus=corpus,
                       train_dataset=unlabelled, args=kept_args).train()
    assert "refit" not in kept and "final/ is step" in kept["message"]
