"""The ``lsr_*`` options shared by ``rag-capg train`` and ``rag-capg eval``, and the judge they build.

``JudgeArguments`` says which judge (kind, model, prompt, ...); ``JudgeFailureArguments`` says how a caller
treats it (stop or skip on failure, a timeout). ``build_judge`` turns the options into a judge object and
``as_cached_judge`` puts any judge (an object, a kind name, a model id or a plain callable) behind the
score cache: the one place where both the CLI and the Python API get their LSR from.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rag_capg.config_parsing import Options
from rag_capg.errors import InputError
from rag_capg.judges.base import CallableJudge, Judge, LabelOracle
from rag_capg.judges.cache import FailurePolicy, ScoreCache

LSRKind = Literal["label_oracle", "cross_encoder", "llm_judge", "bi_encoder", "callable"]
MODEL_KINDS = ("cross_encoder", "llm_judge", "bi_encoder")


@dataclass
class JudgeFailureArguments(Options):
    lsr_on_error: FailurePolicy = field(default="error", metadata={"help": (
        "a judge that raises, times out or returns NaN: stop with an error, or drop that query (counted)")})
    lsr_timeout: float | None = field(default=None, metadata={"help": (
        "seconds one judge call may take before it counts as failed (null = no limit)")})

    def check(self) -> None:
        super().check()
        if self.lsr_timeout is not None and not (self.lsr_timeout > 0 and math.isfinite(self.lsr_timeout)):
            raise InputError(f"must be a positive number of seconds (or null), got {self.lsr_timeout}",
                             field="lsr_timeout")


@dataclass
class JudgeArguments(JudgeFailureArguments):
    lsr: LSRKind | Literal["none"] = field(default="label_oracle", metadata={"help": (
        "the frozen late-stage ranker: label_oracle (the qrels), cross_encoder, llm_judge, bi_encoder or "
        "callable (eval also takes none: first stage only)")})
    lsr_model: str | None = field(default=None, metadata={"help": (
        "cross_encoder / llm_judge / bi_encoder: Hub id or local path (or package:NAME)")})
    lsr_prompt: str | None = field(default=None, metadata={"help": (
        "llm_judge: prompt template with {query} and {passage}; the score is P(yes) / (P(yes) + P(no))")})
    lsr_callable: str | None = field(default=None, metadata={"help": (
        "callable: 'module:function' taking (query_ids, queries, passage_ids, passages) -> scores (B, K); "
        "scores must be pointwise (see README, 'The callable contract')")})
    lsr_chat_template: bool = field(default=False, metadata={"help": (
        "llm_judge: wrap the prompt in the tokenizer's chat template as one user turn (instruction-tuned LLMs)")})
    lsr_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": (
        "llm_judge: weight dtype; cross_encoder: autocast dtype. auto = bfloat16 on a GPU, float32 on a CPU (the "
        "yes/no logits and the cross-encoder's logit are computed in float32 either way)")})
    lsr_batch_size: int = field(default=32, metadata={"help": "pairs per LSR forward pass"})

    def check(self) -> None:
        super().check()
        if self.lsr_batch_size < 1:
            raise InputError(f"must be >= 1, got {self.lsr_batch_size}", field="lsr_batch_size")
        if self.lsr in MODEL_KINDS and not self.lsr_model:
            raise InputError(f"lsr={self.lsr} needs lsr_model (a Hub id or local path)", field="lsr_model")
        if self.lsr == "callable" and (not self.lsr_callable or ":" not in self.lsr_callable):
            raise InputError("lsr=callable needs lsr_callable='module:function'", field="lsr_callable")
        if self.lsr_prompt is not None and not ("{query}" in self.lsr_prompt and "{passage}" in self.lsr_prompt):
            raise InputError("the prompt must contain {query} and {passage}", field="lsr_prompt")


def build_judge(args: JudgeArguments, queries=None, corpus=None, *, device: torch.device | str = "cpu",
                cache_dir: str | Path | None = None) -> Judge:
    """The judge the options name (not yet behind the cache; see ``as_cached_judge``).

    ``queries`` (a QuerySet) gives the label oracle its qrels; a bi-encoder teacher starts from its corpus
    embeddings when ``cache_dir/embeddings`` already holds them (an earlier ``rag-capg eval`` of the teacher):
    the same normalised vectors it would compute batch by batch, without encoding a passage twice."""
    from rag_capg.judges import models
    from rag_capg.retrieval.retriever import resolve_model

    device = torch.device(device)
    kind = args.lsr
    if kind == "label_oracle":
        if queries is None or not queries.labelled:
            split = getattr(queries, "split", None)
            raise InputError(f"split {split!r} has no labels for the label oracle", field="lsr")
        return LabelOracle(queries.qrels)
    if kind == "cross_encoder":
        return models.CrossEncoderJudge(resolve_model(args.lsr_model), batch_size=args.lsr_batch_size,
                                        device=str(device), dtype=args.lsr_dtype)
    if kind == "llm_judge":
        extra = {"prompt_template": args.lsr_prompt} if args.lsr_prompt else {}
        dtype = models.resolve_dtype(args.lsr_dtype, device)
        return models.LLMJudge(resolve_model(args.lsr_model), batch_size=args.lsr_batch_size, device=str(device),
                               use_chat_template=args.lsr_chat_template, dtype=dtype, **extra)
    if kind == "bi_encoder":
        judge = models.BiEncoderTeacher(resolve_model(args.lsr_model), batch_size=args.lsr_batch_size,
                                        device=str(device))
        if corpus is not None and cache_dir is not None:
            seed_teacher_from_cache(judge, corpus, Path(cache_dir) / "embeddings")
        return judge
    if kind == "callable":  # "module:function" taking (query_ids, queries, passage_ids, passages)
        module, _, fn_name = args.lsr_callable.partition(":")
        try:
            fn = getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as err:
            raise InputError(f"cannot import {args.lsr_callable!r}: {err}", field="lsr_callable") from None
        return CallableJudge(fn, identity=f"callable:{args.lsr_callable}")
    raise InputError(f"no judge to build for lsr={kind!r}", field="lsr")


def as_judge(judge: Any, queries=None, corpus=None, *, device: torch.device | str = "cpu",
             cache_dir: str | Path | None = None) -> Judge:
    """Any judge a user may pass to the trainer, as a Judge: an object with ``identity`` and ``score``;
    ``JudgeArguments`` (built here, on ``device``: what the CLI passes); the name "label_oracle" (the training
    queries' qrels); another string, a cross-encoder's Hub id or path (as TRL's ``reward_funcs`` takes a
    reward model's id); or a plain callable with the judge signature, keyed in the cache by its module and
    qualified name."""
    if isinstance(judge, (ScoreCache, Judge)) and not isinstance(judge, type):
        return judge
    if isinstance(judge, JudgeArguments):
        return build_judge(judge, queries, corpus, device=device, cache_dir=cache_dir)
    if isinstance(judge, str):
        kind = judge if judge == "label_oracle" else "cross_encoder"
        return build_judge(JudgeArguments(lsr=kind, lsr_model=None if kind == "label_oracle" else judge), queries,
                           device=device)
    if callable(judge):
        name = f"{getattr(judge, '__module__', '?')}.{getattr(judge, '__qualname__', type(judge).__name__)}"
        return CallableJudge(judge, identity=f"callable:{name}")
    raise TypeError(f"judge must be a Judge (identity + score), 'label_oracle', a cross-encoder id or a "
                    f"callable, got {type(judge).__name__}")


def as_cached_judge(judge: Any, *, cache_dir: str | Path, on_error: FailurePolicy = "error",
                    timeout: float | None = None, queries=None, corpus=None,
                    device: torch.device | str = "cpu") -> ScoreCache:
    """``judge`` (see as_judge) behind a ScoreCache: one sqlite file per judge identity under
    ``cache_dir/lsr`` (shared by processes), or in memory for the label oracle, whose scores cost nothing."""
    judge = as_judge(judge, queries, corpus, device=device, cache_dir=cache_dir)
    if isinstance(judge, ScoreCache):
        return judge
    path = None if isinstance(judge, LabelOracle) else \
        Path(cache_dir) / "lsr" / f"{hashlib.sha256(judge.identity.encode()).hexdigest()[:16]}.sqlite"
    return ScoreCache(judge, path, on_failure=on_error, timeout=timeout)


def seed_teacher_from_cache(teacher, corpus, cache_dir: Path) -> bool:
    """Hand a BiEncoderTeacher the corpus embeddings cached under cache_dir, if there; True when it was."""
    from rag_capg.retrieval.retriever import corpus_cache_path, encode_corpus

    if not corpus_cache_path(teacher.model, corpus, cache_dir, normalize=True).is_file():
        return False
    emb = encode_corpus(teacher.model, corpus, cache_dir=cache_dir, normalize=True, show_progress=False)
    teacher.add_passage_embeddings(corpus.ids, emb)
    return True
