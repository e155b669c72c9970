"""rag_capg.retrieval.inputs: the data options shared by train and eval."""

from __future__ import annotations

import pytest

from rag_capg.errors import InputError
from rag_capg.retrieval.data import load_queries
from rag_capg.retrieval.inputs import TrainDataArguments
from tests.training.test_trainer import config, train


def test_ignore_train_labels_drops_the_qrels_and_refuses_the_label_oracle(tiny_beir_dir):
    args = TrainDataArguments(dataset=str(tiny_beir_dir), ignore_train_labels=True)
    corpus = args.load_corpus()
    queries = args.load_train_queries(corpus, require_labels=False)
    labelled = load_queries(str(tiny_beir_dir), "train", corpus)
    assert labelled.labelled and queries.ids == labelled.ids and queries.texts == labelled.texts
    assert not queries.labelled and all(not queries.qrels.get(q) for q in queries.ids)
    with pytest.raises(InputError) as err:
        args.load_train_queries(corpus, require_labels=True)
    assert err.value.field == "ignore_train_labels"


def test_a_label_free_run_on_a_labelled_split_chooses_on_the_judge(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    summary = train(config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, ignore_train_labels=True,
                           lsr="callable", lsr_callable="tests.training.test_trainer:counting_judge",
                           dev_fraction=0.5, dev_max_queries=None, eval_split=""))
    assert summary["selection"]["dev_labels"] == "judge"
    assert (tmp_path / "run" / "dev_qrels.json").is_file()
