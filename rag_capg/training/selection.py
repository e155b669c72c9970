"""Choosing the model to ship without looking at the test split: a dev part held out of the training queries,
and what "better" means on it.

With labels, the dev queries keep their qrels and the checkpoint is chosen on their ESR metric. Without
labels, the judge labels them once, at the start: for each dev query it scores the starting model's top
``pool`` passages and its own top ``num_relevant`` become that query's relevant set (pseudo-qrels). The
checkpoint is then chosen on how well the ESR agrees with the judge: Recall@K of the judge's favourites is
"do they reach the candidate set", nDCG@10 "are they at the top" - the same metrics as with labels, so one
code path serves both. The starting model (step 0) is a candidate like any other: a run that never beats it
ships it unchanged.
"""

from __future__ import annotations

import hashlib

import torch

from rag_capg.retrieval.data import QuerySet


def split_dev(queries: QuerySet, fraction: float, *, max_queries: int | None, seed: int,
              min_queries: int = 5) -> tuple[QuerySet, QuerySet | None]:
    """(training part, dev part) of ``queries``. A query's place depends only on (seed, its id): the order of
    sha256(seed:id) decides, so the split is the same in every process and on every resume, and a query
    keeps its side when others are added. The dev part is round(fraction * n) queries, capped at
    ``max_queries``; None when that is fewer than ``min_queries`` (too few to choose anything on)."""
    n_dev = round(fraction * len(queries))
    if max_queries is not None:
        n_dev = min(n_dev, max_queries)
    if n_dev < min_queries or n_dev >= len(queries):
        return queries, None
    order = sorted(range(len(queries)), key=lambda i: hashlib.sha256(f"{seed}:{queries.ids[i]}".encode()).digest())
    dev = set(order[:n_dev])
    train_idx = [i for i in range(len(queries)) if i not in dev]
    return queries.subset(train_idx), queries.subset(sorted(dev), split="dev")


@torch.no_grad()
def judge_pseudo_qrels(dev: QuerySet, run: dict[str, dict[str, float]], corpus, judge, *,
                       num_relevant: int) -> dict[str, dict[str, int]]:
    """The judge's top ``num_relevant`` of each dev query's pool (``run``: the starting model's top passages),
    graded num_relevant .. 1 by the judge's order, as qrels. A query the judge fails on gets no labels."""
    from rag_capg.evaluation.metrics import rank_documents

    text_of = dict(zip(dev.ids, dev.texts))
    qrels: dict[str, dict[str, int]] = {}
    for qid in dev.ids:
        pool = rank_documents(run[qid])
        s = judge.score([qid], [text_of[qid]], [pool], [[corpus.texts[corpus.index_of[d]] for d in pool]])[0]
        if not torch.isfinite(s).all():
            qrels[qid] = {}
            continue
        top = s.topk(min(num_relevant, len(pool))).indices.tolist()
        qrels[qid] = {pool[j]: num_relevant - r for r, j in enumerate(top)}
    return qrels


def shipped_step(best_step: int, start: dict[str, float], best: dict[str, float], alpha: float) -> tuple[int, float]:
    """The step whose weights final/ holds, and the p-value that decided it.

    The best checkpoint on dev ships only if its per-query dev metric beats the starting model's with a
    paired randomisation test p-value below ``alpha``: on a few dozen dev queries the best of ten noisy
    evaluations is better than the start by chance alone, and shipping it would be silent harm. Otherwise
    (and when the best is the start itself) step 0 ships.
    """
    from rag_capg.evaluation.metrics import paired_test

    if best_step == 0 or not start or set(start) != set(best):
        return 0, 1.0
    p_value = paired_test(start, best)
    return (best_step if p_value < alpha else 0), p_value


def refit(trainer, shipped: int) -> tuple[dict | None, dict]:
    """Train again from the starting weights on all the training queries, the dev part included, for as many
    epochs as the shipped checkpoint had trained, and make that ``trainer.model`` (what final/ holds).

    The dev part answered two questions: whether training helps at all (the gate of ``shipped_step``) and how
    long to train. Once they are answered its queries need not stay unused: with 20% of them held out, a
    SciFact run sees a fifth fewer queries than it could. This is the refit of early stopping (train, choose the
    length on held-out data, train again on everything for that length); it runs only when the gate passed.
    The refit model itself is not checked on the dev queries, which it trained on. A nested trainer does the
    work in ``output_dir/refit`` (its own logs and checkpoints, so a killed refit resumes there); its final/
    becomes the outer run's. Returns (the eval split's row for the refit model, what run_summary.json records).
    """
    import copy
    import shutil
    from dataclasses import replace

    from rag_capg.judges.base import LabelOracle
    from rag_capg.retrieval.retriever import shippable

    c, n_all, n_train = trainer.args, len(trainer.all_train_q), len(trainer.train_q)
    steps = max(1, round(shipped * n_all / n_train))
    # back to the starting weights, in the model that trained (start_state holds its parameter names; trainer.model
    # may be best/ reloaded, whose names differ under LoRA). They are the base's, so the corpus cache still hits.
    model = trainer.accelerator.unwrap_model(trainer.train_model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trainer.start_state:
                p.copy_(trainer.start_state[n])
    start = copy.deepcopy(shippable(model)) if c.lora_r > 0 else model
    trainer.optimizer = trainer.scheduler = None  # free the first run's optimizer state before the second
    # the label oracle was built on the training part's labels; every other judge keeps its score cache
    judge = trainer.judge_spec if isinstance(trainer.judge.judge, LabelOracle) else trainer.judge
    args = replace(c, output_dir=str(trainer.out / "refit"), dev_fraction=0.0, max_steps=steps, refit=False,
                   eval_every=0, eval_before=False)
    second = type(trainer)(start, judge, args, corpus=trainer.corpus, train_dataset=trainer.all_train_q,
                           eval_dataset=trainer.eval_q, script_args=trainer.script_args)
    second.eval_start_per_query = trainer.eval_start_per_query  # the paired test against the same start
    summary = second.train()
    trainer.model, trainer.doc_emb = second.model, second.doc_emb
    if trainer.accelerator.is_main_process:  # final/ is written once, by the outer run
        shutil.rmtree(trainer.out / "refit" / "final", ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    info = {"steps": steps, "train_queries": n_all, "from_step": shipped, "of_steps": trainer.step,
            "wall_time_s": summary["wall_time_s"], "folder": "refit"}
    return summary["eval_after"], info
