"""rag_capg.retrieval.synthetic_queries and train_queries=corpus_ict / corpus_generated: queries made from the
corpus are deterministic for a seed, come from the corpus, carry no labels, and a tiny `rag-capg train` learns
from them against a bm25 + bi_encoder ensemble."""

from __future__ import annotations

import json

import pytest

from rag_capg.cli import main as cli_main
from rag_capg.errors import InputError
from rag_capg.retrieval.data import Corpus
from rag_capg.retrieval.inputs import TrainDataArguments
from rag_capg.retrieval.synthetic_queries import generated_queries, inverse_cloze_queries, split_sentences
from tests.conftest import write_beir_folder

FACTS = [("Cats", "purr when they are content. A purring cat is usually relaxed and warm. Kittens purr while "
                  "nursing."),
         ("Rockets", "burn liquid fuel with oxygen. The exhaust leaves the nozzle at high speed. Orbit needs about "
                     "eight kilometres per second."),
         ("Bees", "make honey from the nectar of flowers. A colony can hold fifty thousand workers. The queen "
                  "lays the eggs."),
         ("Glaciers", "carve deep valleys into mountains. Their ice moves a few metres each day. Melting ice "
                      "raises the sea."),
         ("Copper", "conducts electricity very well. It is used in most household wiring. Old copper turns "
                    "green in the rain."),
         ("Tea", "contains caffeine and tannins. Green tea is not oxidised at all. Black tea is fully "
                 "oxidised before drying.")]
TEXTS = [f"{t} {body}" for t, body in FACTS] + ["A single sentence passage about owls hunting at night",
                                                "Too. Short. Here."]
CORPUS = Corpus(ids=[f"p{i}" for i in range(len(TEXTS))], texts=TEXTS)


def test_ict_queries_are_seeded_sentences_of_their_passage_without_labels():
    first = inverse_cloze_queries(CORPUS, 4, seed=3)
    assert len(first) == 4 and not first.labelled and all(first.qrels[q] == {} for q in first.ids)
    assert inverse_cloze_queries(CORPUS, 4, seed=3).texts == first.texts  # same seed, same queries
    assert inverse_cloze_queries(CORPUS, 4, seed=4).ids != first.ids
    for qid, text in zip(first.ids, first.texts):
        _, pid, i = qid.split(":")
        sentences = split_sentences(CORPUS.texts[CORPUS.index_of[pid]])
        assert len(sentences) >= 2 and sentences[int(i)] == text and len(text.split()) >= 4
    everything = inverse_cloze_queries(CORPUS, 100, seed=0)  # one per qualifying passage: the last two never
    assert sorted(q.split(":")[1] for q in everything.ids) == [f"p{i}" for i in range(6)]
    assert all(len(t.split()) <= 3 for t in inverse_cloze_queries(CORPUS, 6, max_words=3).texts)
    with pytest.raises(InputError, match="train_queries"):
        inverse_cloze_queries(Corpus(ids=["a"], texts=["One sentence only, no more"]), 5)


def test_split_sentences():
    assert split_sentences("It rained. Then 3 cats came! Did they? \"Yes.\" ok.") == [
        "It rained.", "Then 3 cats came!", "Did they?", "\"Yes.\" ok."]


def test_generated_queries_run_a_causal_lm_deterministically(tiny_causal_lm_path):
    # the tiny random LM writes gibberish, but the whole path runs: prompt, greedy decoding, first line kept
    first = generated_queries(CORPUS, 3, str(tiny_causal_lm_path), seed=1, max_new_tokens=6, batch_size=2)
    assert 1 <= len(first) <= 3 and not first.labelled and all(q.startswith("gen:p") for q in first.ids)
    assert all(t and "\n" not in t for t in first.texts)
    again = generated_queries(CORPUS, 3, str(tiny_causal_lm_path), seed=1, max_new_tokens=6, batch_size=2)
    assert again.ids == first.ids and again.texts == first.texts  # greedy decoding: the same queries


def test_options_choose_the_source_and_refuse_the_label_oracle(tmp_path):
    data = write_beir_folder(tmp_path / "d", [{"_id": p, "text": t} for p, t in zip(CORPUS.ids, TEXTS)],
                             [{"_id": "x", "text": "unused"}], {"test": [("x", "p0", 1)]})
    args = TrainDataArguments(dataset=str(data), train_queries="corpus_ict", num_synthetic_queries=3,
                              synthetic_queries_seed=3)
    corpus = args.load_corpus()
    queries = args.load_train_queries(corpus, require_labels=False)
    assert queries.texts == inverse_cloze_queries(corpus, 3, seed=3).texts
    with pytest.raises(InputError, match="label"):
        args.load_train_queries(corpus, require_labels=True)
    with pytest.raises(InputError, match="query_generator_model"):
        TrainDataArguments(train_queries="corpus_generated")
    with pytest.raises(InputError, match="query_generator_model"):
        TrainDataArguments(query_generator_model="some/lm")


def test_cli_trains_on_corpus_queries_against_a_bm25_plus_bi_encoder_ensemble(tmp_path, tiny_bi_encoder_path):
    corpus_rows = [{"_id": p, "title": "", "text": t} for p, t in zip(CORPUS.ids, TEXTS)]
    data = write_beir_folder(tmp_path / "data", corpus_rows, [{"_id": "t0", "text": "why do cats purr"},
                                                              {"_id": "t1", "text": "what do bees make"}],
                             {"test": [("t0", "p0", 1), ("t1", "p2", 1)]})  # no train split at all
    members = f"[{{lsr: bm25, weight: 1.0}}, {{lsr: bi_encoder, lsr_model: '{tiny_bi_encoder_path}', weight: 1.0}}]"
    run = tmp_path / "run"
    rc = cli_main(["train", f"model={tiny_bi_encoder_path}", f"dataset={data}", "train_queries=corpus_ict",
                   "num_synthetic_queries=6", "lsr=ensemble", f"lsr_members={members}", "reward_mapping=sigmoid",
                   "candidates=4", "batch_size=3", "max_steps=4", "learning_rate=1e-3", "warmup_ratio=0",
                   "report_to=none", "progress=false", "log_every=1", f"output_dir={run}",
                   f"cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(r["loss"] == r["loss"] for r in rows)
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["train_queries"] == 6 and summary["lsr"].startswith("EnsembleJudge[1*BM25Judge,1*BiEncoderTeacher]")
    assert len(list((tmp_path / "cache" / "lsr").glob("*.sqlite"))) == 3  # the ensemble and each member
