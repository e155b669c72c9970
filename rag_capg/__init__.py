"""rag-capg: fine-tune dense retrievers end to end with credit-assigned policy gradient (CA-PG).

The early-stage ranker (a sentence-transformers bi-encoder) is a Plackett-Luce policy over the corpus;
a frozen late-stage ranker picks from its sampled candidates and its judgement is the reward.
See ``rag_capg.estimators`` for the surrogate losses and README.md for the commands.
"""

__version__ = "0.1.0"
