"""``CAPGConfig``: every hyperparameter of CA-PG training, with its help text (TRL's config shape: a flat
dataclass passed to the trainer as ``args``).

What to train and against whom (the model, the data, the judge) are objects handed to ``CAPGTrainer``; the
CLI builds them from its own option groups (rag_capg.retrieval.inputs, rag_capg.judges.build) and a recipe
(rag_capg/recipes/*.yaml) is one flat mapping over all of them. ``check`` rejects inconsistent values with
an ``InputError`` naming the field, so a bad recipe fails before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rag_capg.errors import InputError
from rag_capg.judges.build import JudgeFailureArguments
from rag_capg.judges.rewards import PickPolicy, RewardMapping
from rag_capg.pg.estimators import Estimator
from rag_capg.retrieval.inputs import RetrieverArguments

SchedulerName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                        "constant_with_warmup"]
Tracker = Literal["none", "all", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml",
                  "dvclive", "swanlab"]


@dataclass
class CAPGConfig(RetrieverArguments, JudgeFailureArguments):
    """Fine-tune a sentence-transformers bi-encoder (the early-stage ranker) with policy gradient against a
    frozen late-stage ranker (LSR) whose judgement is the reward.

    Example:
        >>> args = CAPGConfig(output_dir="runs/mine", estimator="top1", max_steps=100)
    """

    # ---- early-stage ranker (the policy) ---------------------------------------------------------------
    tau: float = field(default=0.03, metadata={"help": (
        "policy temperature: logits = similarity / tau. Cosine lies in [-1, 1], so tau sets how peaked the "
        "Plackett-Luce policy over the corpus is (MNRL trains at 0.05)")})
    mode: Literal["query_tower", "both_towers"] = field(default="query_tower", metadata={"help": (
        "query_tower: train a copy of the encoder for queries against a fixed, cached document index "
        "(exact logits, no re-indexing); both_towers: train the shared encoder and re-index every "
        "reindex_every steps")})
    reindex_every: int = field(default=100, metadata={"help": "both_towers: re-encode the corpus every R steps"})
    grad_chunk_size: int | None = field(default=None, metadata={"help": (
        "both_towers: re-encode the passages the loss touches (B*G*K candidates + B*K top items per step) "
        "at most this many at a time, each chunk's activations recomputed in backward (activation "
        "checkpointing; one more encoder forward) rather than kept; null = all at once (on SciFact the GPU "
        "recipe's B=32, G=4, K=20 touch ~1,550-1,850 passages a step)")})
    softmax: Literal["full", "top_m"] = field(default="full", metadata={"help": (
        "full: normalise over the whole corpus; top_m: policy over the top-M items of the index plus a "
        "sampled estimate of the tail mass (large corpora; biased, see the benchmark)")})
    top_m: int = field(default=1000, metadata={"help": "top_m softmax: items kept exactly"})
    tail_samples: int = field(default=256, metadata={"help": "top_m softmax: uniform tail samples for log-mass"})
    top_m_index: str = field(default="Flat", metadata={"help": (
        "top_m softmax: the FAISS index_factory string of the index that finds the top-M: Flat (exact), or an "
        "inverted file for millions of passages, e.g. IVF1000,Flat (trained on the corpus; about sqrt(N) lists)")})
    top_m_search_params: str | None = field(default=None, metadata={"help": (
        "top_m softmax: FAISS ParameterSpace settings of that index, e.g. nprobe=32")})

    # ---- rollout: candidates, the LSR's picks, rewards --------------------------------------------------
    candidates: int = field(default=20, metadata={"help": "K: size of the candidate list the ESR samples"})
    num_picks: int = field(default=1, metadata={"help": "L: items the LSR picks from each candidate list"})
    group_size: int = field(default=1, metadata={"help": "G: candidate lists sampled per query"})
    lsr_policy: PickPolicy = field(default="top", metadata={"help": (
        "the LSR picks its top-L candidates ('optimal' LSR) or samples L by softmax(score / T) ('noisy')")})
    lsr_temperature: float = field(default=1.0, metadata={"help": "lsr_policy=sample: temperature T"})
    reward_mapping: RewardMapping = field(default="identity", metadata={"help": (
        "non-negative map from the LSR score to the reward (identity for grades / probabilities)")})
    baseline: Literal["none", "group_min_shift"] = field(default="none", metadata={"help": (
        "none, or group-normalised rewards shifted by the group minimum (stays >= 0 for CA-PG; needs G > 1; "
        "the spread is floored at 0.01, so a judge's noise across a group of equally bad candidates stays small)")})

    # ---- estimator -------------------------------------------------------------------------------------
    estimator: Estimator = field(default="top1", metadata={"help": (
        "surrogate loss: top1 (log softmax of the picked items: CA-PG-SwR), capg (credit to the picked items "
        "through their approximate inclusion probability), capg_exact, vpg (ordered PL list likelihood), "
        "vpg_swr (with replacement); which to choose: README, 'Which estimator'")})
    exact_nodes: int = field(default=12, metadata={"help": "capg_exact: quadrature nodes"})
    exact_top_m: int | None = field(default=23, metadata={"help": (
        "capg_exact: exact race over the top_m + 1 items, the rest as a tail term (null = all N items)")})
    beta: float = field(default=0.0, metadata={"help": (
        "weight of KL(policy || initial policy) over the corpus softmax, added to the loss per query "
        "(TRL's beta): keeps a few training queries from dragging the whole ranking away (0 = off)")})

    # ---- what trains ------------------------------------------------------------------------------------
    lora_r: int = field(default=0, metadata={"help": (
        "LoRA rank (peft) on every linear layer of the trained encoder: far fewer trainable weights, merged "
        "back into the saved model (0 = train every weight)")})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale: the update is (lora_alpha / lora_r) B A"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout on the update's input"})

    # ---- optimisation ----------------------------------------------------------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
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
    epochs: int = field(default=8, metadata={"help": "passes over the training queries (if max_steps is unset)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})

    # ---- choosing the model to ship, evaluation, checkpoints, logging -------------------------------------
    dev_fraction: float = field(default=0.2, metadata={"help": (
        "share of the training queries held out (never trained on) to choose the checkpoint that becomes "
        "final/, the starting model included; with labels the dev queries' own qrels, without labels the "
        "judge's favourites among the starting model's candidates (0 = no hold-out: final/ is the last step)")})
    dev_max_queries: int | None = field(default=200, metadata={"help": "at most this many dev queries"})
    dev_alpha: float = field(default=0.1, metadata={"help": (
        "ship a trained checkpoint only if it beats the starting model on the dev queries with a p-value below "
        "this (paired randomisation test over the dev queries); otherwise final/ is the starting model. A few "
        "dozen dev queries rarely show a real gain apart from noise; 1 = ship the best on dev whatever its margin")})
    refit: bool = field(default=True, metadata={"help": (
        "when the dev queries choose a trained checkpoint, train again from the start on all the training "
        "queries, the dev ones included, for as many epochs as that checkpoint had, and ship the result "
        "(early stopping's refit: the dev part chooses whether and how long to train, then no query is left "
        "unused). The refit model is not itself checked on the dev queries; false = ship the checked checkpoint")})
    dev_seed: int = field(default=0, metadata={"help": (
        "seed of the dev hold-out (a query's side depends only on this seed and its id)")})
    dev_judge_top: int = field(default=5, metadata={"help": (
        "without labels: the judge's top-N of the starting model's top dev_judge_depth passages count as a dev "
        "query's relevant ones")})
    dev_judge_depth: int | None = field(default=None, metadata={"help": (
        "without labels: how deep in the starting model's ranking the judge looks for them (None = 2K). The "
        "deeper, the less the labels favour the start's own top K, at dev queries x depth judge calls, once")})
    eval_every: int | None = field(default=None, metadata={"help": (
        "evaluate (dev and eval split) every N steps; null = 10 times over the run; 0 = before and after only")})
    eval_before: bool = field(default=True, metadata={"help": "evaluate the initial model at step 0"})
    metric_for_best: Literal["ndcg@10", "recall@K"] = field(default="ndcg@10", metadata={
        "help": "dev metric that chooses the checkpoint shipped as final/"})
    save_every: int = field(default=0, metadata={"help": "write checkpoints/step-N every N steps (0 = off)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    output_dir: str = field(default="runs/capg", metadata={"help": "run folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    report_to: Tracker = field(default="tensorboard", metadata={"help": (
        "experiment tracker through accelerate (tensorboard writes OUTPUT_DIR/tensorboard; all = every one "
        "installed)")})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})

    def check(self) -> None:
        super().check()

        def bad(name: str, message: str):
            raise InputError(message, field=name)

        for name in ("candidates", "group_size", "num_picks", "batch_size", "gradient_accumulation_steps",
                     "epochs", "reindex_every", "top_m", "tail_samples", "exact_nodes", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lora_r < 0 or not 0 <= self.lora_dropout < 1:
            bad("lora_r" if self.lora_r < 0 else "lora_dropout", "lora_r must be >= 0, lora_dropout in [0, 1)")
        for name in ("max_steps", "save_total_limit", "exact_top_m", "dev_max_queries",
                     "grad_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1 (or null), got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("tau", "lsr_temperature"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                bad(name, f"must be a finite number > 0, got {getattr(self, name)}")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "beta"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                bad(name, f"must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.dev_alpha <= 1:
            bad("dev_alpha", f"must lie in (0, 1], got {self.dev_alpha}")
        if not 0 <= self.dev_fraction < 1:
            bad("dev_fraction", f"must lie in [0, 1), got {self.dev_fraction}")
        if self.dev_judge_top < 1:
            bad("dev_judge_top", f"must be >= 1, got {self.dev_judge_top}")
        if self.dev_judge_depth is not None and self.dev_judge_depth < self.dev_judge_top:
            bad("dev_judge_depth", f"must be >= dev_judge_top ({self.dev_judge_top}), got {self.dev_judge_depth}")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", f"must lie in [0, 1], got {self.warmup_ratio}")
        if self.num_picks > self.candidates:
            bad("num_picks", f"the LSR picks L={self.num_picks} items from K={self.candidates} candidates")
        if self.batch_size % self.gradient_accumulation_steps:
            bad("batch_size", f"{self.batch_size} queries do not split into "
                              f"{self.gradient_accumulation_steps} equal accumulation steps")
        if self.baseline == "group_min_shift" and self.group_size < 2:
            bad("baseline", "group_min_shift compares candidate lists of one query: set group_size >= 2")
        if self.beta > 0 and self.softmax != "full":
            bad("beta", "the KL penalty is over the full corpus softmax: set softmax=full (or beta=0)")
        if self.softmax == "top_m" and self.top_m < self.candidates:
            bad("top_m", f"top_m={self.top_m} must be >= candidates={self.candidates}")
