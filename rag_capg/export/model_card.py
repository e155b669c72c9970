"""The README.md of an exported model: Hub metadata (YAML) plus a body that says how the model was made.

The YAML is written by huggingface_hub's own ``ModelCardData`` (so ``model-index`` has exactly the shape the
Hub parses into evaluation results), the body by this module. Everything comes from the run folder:
``run_summary.json`` first, ``config.yaml`` (the TrainConfig) second, ``eval.jsonl`` for the numbers of the
exported checkpoint. A field the run does not record reads "unknown" - the card never fails on a missing key.

Local paths (a base model or dataset on the trainer's disk) appear by their last component only, and only
Hub ids go into the ``base_model`` / ``datasets`` metadata, which the Hub validates as repository ids.
"""

from __future__ import annotations

import os
import re
from typing import Any

UNKNOWN = "unknown"

CAPG_BIBTEX = """@inproceedings{kiyohara2026capg,
  title     = {Credit-assigned Policy Gradient for Early Stage Retrieval in Two-stage Ranking},
  author    = {Kiyohara and others},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2026},
  note      = {arXiv:2605.26385}
}"""

SBERT_BIBTEX = """@inproceedings{reimers-2019-sentence-bert,
  title     = {Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks},
  author    = {Reimers, Nils and Gurevych, Iryna},
  booktitle = {Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing},
  year      = {2019},
  publisher = {Association for Computational Linguistics},
  url       = {https://arxiv.org/abs/1908.10084}
}"""

# Training options shown in the hyperparameter table, in this order, when the run records them.
HYPERPARAMETERS = ("mode", "similarity", "tau", "softmax", "top_m", "candidates", "num_picks", "group_size",
                   "baseline", "lsr_policy", "lsr_temperature", "reward_mapping", "estimator", "learning_rate",
                   "weight_decay", "scheduler", "warmup_ratio", "batch_size", "gradient_accumulation_steps",
                   "max_grad_norm", "mixed_precision", "epochs", "max_steps", "reindex_every", "seed")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_METRICS = {"step", "split", "epoch", "time", "wall_time", "wall_time_s", "queries", "num_queries", "checkpoint"}


def lookup(sources: list[dict], *names: str, default: Any = None) -> Any:
    """First non-empty value of any of ``names`` (dotted for nesting) in any source, in order."""
    for source in sources:
        for name in names:
            value: Any = source
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value not in (None, "", {}, []):
                return value
    return default


def is_hub_id(name: Any) -> bool:
    """``org/name`` that is not a path on this machine (the Hub validates metadata ids)."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def display_name(name: Any) -> str:
    """A model or dataset as the card shows it: Hub ids and ``package:`` / ``demo:`` names as they are, a
    local path by its last component (the trainer's directory layout is nobody's business)."""
    if name in (None, ""):
        return UNKNOWN
    name = str(name)
    if is_hub_id(name) or re.match(r"^[a-z]+:", name) or ("/" not in name and os.sep not in name):
        return name
    return f"{os.path.basename(os.path.normpath(name))} (local folder)"


def fmt(value: Any) -> str:
    if value is None or value == "":
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return UNKNOWN
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def metric_values(row: Any) -> dict[str, float]:
    """The numeric metrics of an eval row ({"step", "split", "recall@20", "ndcg@10", ...})."""
    if not isinstance(row, dict):
        return {}
    return {k: float(v) for k, v in row.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def hub_metric_type(metric: str) -> str:
    """``ndcg@10`` -> ``ndcg_at_10`` (the names MTEB cards use in model-index)."""
    return re.sub(r"[^a-z0-9_]", "_", metric.lower().replace("@", "_at_"))


def pretty_metric(metric: str) -> str:
    head, at, cut = metric.partition("@")
    return {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR", "map": "MAP"}.get(head.lower(), head) + at + cut


def build_model_card(*, summary: dict, config: dict, eval_before: dict | None, eval_after: dict | None,
                     eval_split: str | None, checkpoint: str, query_tower: bool, export_versions: dict,
                     model_id: str, embedding_dim: int | None = None, base_model: str | None = None,
                     license: str | None = None, onnx: dict | None = None) -> str:
    """Return the README.md text: YAML metadata between ``---`` lines, then the markdown body.

    ``eval_before`` / ``eval_after``: metric -> value of the initial model and of the exported checkpoint
    (None when the run did not evaluate them). ``checkpoint``: which checkpoint was exported, in words.
    ``onnx``: the figures of rag_capg.export.onnx_export.check_towers plus ``files``, when ONNX was exported.
    """
    from huggingface_hub import EvalResult, ModelCardData

    sources = [summary, config]
    base = base_model or lookup(sources, "base_model", "model", "model_name_or_path")
    dataset = lookup(sources, "dataset", "data.dataset")
    split = eval_split or lookup(sources, "eval_split", default=None)
    license = license or lookup(sources, "license")
    after = metric_values(eval_after)
    before = metric_values(eval_before)

    eval_results = [
        EvalResult(task_type="retrieval", task_name="Retrieval", dataset_type=str(dataset) if is_hub_id(dataset)
                   else display_name(dataset).removesuffix(" (local folder)"),
                   dataset_name=display_name(dataset).removesuffix(" (local folder)"),
                   dataset_split=split or None, metric_type=hub_metric_type(name), metric_value=value,
                   metric_name=pretty_metric(name))
        for name, value in after.items()]
    tags = ["sentence-transformers", "feature-extraction", "sentence-similarity", "retrieval", "rag", "capg",
            "policy-gradient", "two-stage-ranking"] + (["asymmetric", "query-tower"] if query_tower else [])
    data = ModelCardData(
        library_name="sentence-transformers", pipeline_tag="sentence-similarity", tags=tags,
        base_model=base if is_hub_id(base) else None, datasets=[dataset] if is_hub_id(dataset) else None,
        license=license or None, model_name=model_id, eval_results=eval_results or None)
    num_queries = lookup([eval_after or {}, eval_before or {}], "queries", "num_queries")
    body = _body(sources, base, dataset, split, num_queries, before, after, checkpoint, query_tower,
                 export_versions, model_id, embedding_dim, onnx)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _body(sources, base, dataset, split, num_queries, before, after, checkpoint, query_tower, export_versions,
          model_id, embedding_dim, onnx) -> str:
    estimator = lookup(sources, "estimator")
    summary, config = sources
    lsr = lookup(sources, "lsr_identity", "lsr.identity", "lsr_id", "lsr")
    lsr_kind = lookup([config, summary], "lsr_kind", "lsr.kind", "lsr")
    lsr_model = lookup(sources, "lsr_model")
    lsr_words = fmt(lsr_kind) + (f" ({display_name(lsr_model)})" if lsr_model else "") + (
        f", identity `{lsr}`" if lsr not in (None, lsr_kind) else "")
    steps = lookup(sources, "steps", "global_step", "num_steps", "max_steps")
    wall = lookup(sources, "wall_time_s", "wall_time_seconds", "wall_time", "train_time_s")
    mode = lookup(sources, "mode", default="query_tower" if query_tower else None)
    train_split = lookup(sources, "train_split")
    num_train = lookup(sources, "num_train_queries", "train_queries")
    lines = [
        f"# {model_id}", "",
        f"A [sentence-transformers](https://www.sbert.net) retriever fine-tuned from **{display_name(base)}** "
        "with policy gradient against a frozen late-stage ranker (LSR), using credit-assigned policy gradient "
        "(CA-PG; Kiyohara et al., ICML 2026, arXiv:2605.26385) as implemented by rag-capg. The retriever "
        "proposes K candidates per query, the LSR picks L of them, and its judgement is the reward.", "",
    ]
    if query_tower:
        lines += ["**Two towers in one model.** Only the query encoder was trained. `encode_query` runs the "
                  "tuned query tower; `encode_document` runs the original base encoder, so an index built "
                  "with the base model stays valid - no re-indexing.", ""]
    lines += [
        "## Model details", "",
        "| | |", "|---|---|",
        f"| Base model | {display_name(base)} |",
        f"| Training mode | {fmt(mode)} |",
        f"| Exported checkpoint | {checkpoint} |",
        f"| Similarity | {fmt(lookup(sources, 'similarity'))} |",
        f"| Embedding dimension | {fmt(embedding_dim or lookup(sources, 'embedding_dim', 'dimension'))} |", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| Training data | {display_name(dataset)}, split `{fmt(train_split)}`"
        + (f", {num_train} queries" if num_train else "") + " |",
        f"| Late-stage ranker (reward) | {lsr_words} |",
        f"| Reward mapping | {fmt(lookup(sources, 'reward_mapping'))} |",
        f"| Estimator | {fmt(estimator)} |",
        f"| Candidate list size K | {fmt(lookup(sources, 'K', 'k', 'candidates', 'num_candidates'))} |",
        f"| LSR picks L | {fmt(lookup(sources, 'L', 'num_picks'))} |",
        f"| Optimizer steps | {fmt(steps)} |",
        f"| Training time | {fmt_duration(wall)} |", "",
        "### Hyperparameters", "",
        "| option | value |", "|---|---|",
    ]
    # Options that do nothing in this run's set-up are left out of the table.
    idle = ({"top_m"} if lookup(sources, "softmax") == "full" else set()) | (
        {"reindex_every"} if mode == "query_tower" else set()) | (
        {"lsr_temperature"} if lookup(sources, "lsr_policy") == "top" else set())
    lines += [f"| `{name}` | {fmt(value)} |" for name in HYPERPARAMETERS
              if name not in idle and (value := lookup(sources, f"config.{name}", name)) is not None]
    lines += ["", "## Evaluation", ""]
    if before or after:
        lines += [f"First-stage retrieval on {display_name(dataset)}, split `{fmt(split)}`"
                  + (f" ({num_queries} queries)" if num_queries else "") + ", before training and for the "
                  "exported checkpoint (Recall@K: does a relevant passage reach the LSR's K candidates?).", "",
                  "| metric | before | after | change |", "|---|---|---|---|"]
        for name in sorted(set(before) | set(after)):
            b, a = before.get(name), after.get(name)
            change = f"{a - b:+.4f}" if a is not None and b is not None else UNKNOWN
            lines.append(f"| {name} | {fmt_metric(b)} | {fmt_metric(a)} | {change} |")
    else:
        lines.append("The run recorded no evaluation for this checkpoint.")
    lines += ["", "## Usage", "", "```bash", "pip install -U sentence-transformers", "```", "", "```python",
              "from sentence_transformers import SentenceTransformer", "",
              f'model = SentenceTransformer("{model_id}")',
              'query_embeddings = model.encode_query(["how do bees make honey?"])',
              'document_embeddings = model.encode_document(["Bees turn nectar into honey.", "Rockets burn fuel."])',
              "scores = model.similarity(query_embeddings, document_embeddings)", "print(scores)", "```", ""]
    if onnx:
        lines += onnx_section(onnx, model_id)
    lines += ["## Library versions", "", "| library | training | export |", "|---|---|---|"]
    trained = lookup(sources, "versions", "library_versions", default={})
    trained = trained if isinstance(trained, dict) else {}
    for name in sorted(set(trained) | set(export_versions)):
        lines.append(f"| {name} | {fmt(trained.get(name))} | {fmt(export_versions.get(name))} |")
    lines += ["", "## Citation", "", "```bibtex", CAPG_BIBTEX, "", SBERT_BIBTEX, "```", ""]
    return "\n".join(lines)


def fmt_metric(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.4f}"


def onnx_section(onnx: dict, model_id: str) -> list[str]:
    """The card's ONNX section: the files, the check against torch (max difference, min cosine), the timing,
    and how to load them today and once optimum-onnx supports transformers 5."""
    files = ", ".join(f"`{f}`" for f in onnx.get("files", []))
    seconds, diff, cosine = onnx.get("seconds", {}), onnx.get("max_abs_diff", {}), onnx.get("min_cosine", {})
    threads = onnx.get("threads", UNKNOWN)
    timed = f"{onnx.get('timed_texts', UNKNOWN)} short texts, {threads} thread{'' if threads == 1 else 's'}"
    lines = ["## ONNX", "",
             f"Each tower's transformer is also saved as ONNX (torch.onnx, opset {onnx.get('opset', UNKNOWN)}) in the "
             f"layout sentence-transformers uses: {files}.", "",
             f"Checked at export with onnxruntime {onnx.get('onnxruntime', UNKNOWN)} against the torch model on "
             f"{onnx.get('texts', UNKNOWN)} texts - an empty one, whitespace only, one of "
             f"{onnx.get('long_text_tokens', UNKNOWN)} tokens cut at {onnx.get('max_seq_length', UNKNOWN)}, CJK, "
             "Cyrillic / Arabic / emoji, short English - through each tower, as one batch and one text at a time. "
             f"Timed on {onnx.get('cpu', 'the export machine')} ({timed}, encode_query, best of 3):", "",
             f"| weights | max abs difference from torch | min cosine with torch | {timed} |", "|---|---|---|---|",
             f"| torch float32 | - | - | {fmt_seconds(seconds.get('torch'))} |"]
    for kind in diff:
        lines.append(f"| ONNX {kind} | {diff[kind]:.1e} | {cosine.get(kind, 0.0):.6f} | "
                     f"{fmt_seconds(seconds.get(kind))} |")
    quantized = "int8" in diff
    lines += ["", "Load them with onnxruntime and the folder's tokenizers (rag-capg with its `onnx` extra; no torch "
              "weights are read):", "", "```python", "from rag_capg.export.onnx import OnnxEncoder", "",
              f'encoder = OnnxEncoder("{model_id}")  # a local folder (huggingface_hub.snapshot_download a Hub id)']
    if quantized:
        lines.append('# int8: OnnxEncoder(folder, file_name="model_qint8_quantized.onnx")')
    lines += ['query_embeddings = encoder.encode_query(["how do bees make honey?"])',
              'document_embeddings = encoder.encode_document(["Bees turn nectar into honey.", "Rockets burn fuel."])',
              "print(encoder.similarity(query_embeddings, document_embeddings))", "```", "",
              f'`SentenceTransformer("{model_id}", backend="onnx")` reads this layout through optimum-onnx, which has '
              "no release for transformers 5 yet (sentence-transformers 6 needs transformers 5); once it has, that "
              "line loads these files without rag-capg.", ""]
    return lines


def fmt_seconds(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.2f} s"
