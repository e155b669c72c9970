"""``OnnxEncoder``: the embeddings of an exported folder's ONNX towers with onnxruntime and the folder's
tokenizers - no torch weights, no sentence-transformers.

``rag-capg export --onnx`` (rag_capg.export.onnx_export) writes sentence-transformers' own layout: each
Transformer module folder (for a query-tower model both ``query_0_Transformer`` and
``document_0_Transformer``) gets ``onnx/model.onnx``, tokenizer inputs in, ``last_hidden_state`` out, batch
and sequence axes dynamic. ``SentenceTransformer(DIR, backend="onnx")`` reads that layout through
optimum-onnx, which has no release for transformers 5 yet; until then this module reads it, applying the
Pooling / Normalize modules and the prompts the folder's modules.json, router_config.json and
config_sentence_transformers.json name, in numpy, as sentence-transformers computes them.

    from rag_capg.export.onnx import OnnxEncoder
    encoder = OnnxEncoder("models/scifact-capg")              # the int8 copy: file_name=INT8_NAME
    scores = encoder.similarity(encoder.encode_query(["how do bees make honey?"]),
                                encoder.encode_document(["Bees turn nectar into honey.", "Rockets burn fuel."]))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

ONNX_NAME = "model.onnx"
INT8_NAME = "model_qint8_quantized.onnx"  # sentence-transformers' name for a custom dynamic-int8 config
Task = Literal["query", "document"]

_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
_POOLING_MODES = {"cls", "max", "mean", "mean_sqrt_len_tokens"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def class_name(module_type: str) -> str:
    return module_type.rsplit(".", 1)[-1]


def module_pipelines(folder: str | Path) -> dict[str, list[tuple[str, Path]]]:
    """``{"query": [(class name, module folder), ...], "document": [...]}`` of a saved model: a Router's
    two routes followed by the modules after it, or the one plain pipeline for both. Raises ValueError for a
    module the ONNX path does not implement (only Transformer, Pooling and Normalize are)."""
    folder = Path(folder)
    modules = _read_json(folder / "modules.json")
    if not modules:
        raise ValueError(f"{folder}: no modules.json, not a sentence-transformers folder")
    if class_name(modules[0]["type"]) == "Router":
        router_dir = folder / modules[0].get("path", "")
        router = _read_json(router_dir / "router_config.json")
        structure, types = router.get("structure", {}), router.get("types", {})
        if set(structure) != {"query", "document"}:
            raise ValueError(f"{router_dir / 'router_config.json'}: routes {sorted(structure)}; the ONNX "
                             "encoder handles a query/document Router only")
        tail = [(class_name(m["type"]), folder / m.get("path", "")) for m in modules[1:]]
        pipelines = {route: [(class_name(types[name]), router_dir / name) for name in structure[route]] + tail
                     for route in ("query", "document")}
    else:
        steps = [(class_name(m["type"]), folder / m.get("path", "")) for m in modules]
        pipelines = {"query": steps, "document": steps}
    for route, steps in pipelines.items():
        names = [name for name, _ in steps]
        if not names or names[0] != "Transformer" or not set(names[1:]) <= {"Pooling", "Normalize"}:
            raise ValueError(f"{folder}: the {route} route is {names}; the ONNX encoder handles a Transformer "
                             "followed by Pooling / Normalize modules only")
    return pipelines


def transformer_config(path: Path) -> dict:
    """The Transformer module's sentence_bert_config.json, if the ONNX path handles it (ValueError if not)."""
    config = _read_json(path / "sentence_bert_config.json")
    modality = config.get("modality_config") or {"text": {"method_output_name": "last_hidden_state"}}
    unsupported = [key for key in ("query_expansion", "processing_kwargs", "do_lower_case") if config.get(key)]
    if unsupported or config.get("transformer_task", "feature-extraction") != "feature-extraction" or \
            set(modality) != {"text"} or modality["text"].get("method_output_name") != "last_hidden_state":
        raise ValueError(f"{path / 'sentence_bert_config.json'}: only a text feature-extraction Transformer "
                         f"without {unsupported or 'custom modalities'} is handled by the ONNX encoder")
    return config


def read_layout(folder: str | Path) -> dict[str, tuple[Path, list[tuple[str, object]]]]:
    """``{route: (Transformer module folder, [("Pooling", (modes, include_prompt)) | ("Normalize", None)])}``
    of a saved model; ValueError for anything OnnxEncoder does not implement, before any file is read."""
    layout = {}
    for route, steps in module_pipelines(folder).items():
        path = steps[0][1]
        transformer_config(path)
        tail: list[tuple[str, object]] = []
        for name, module_dir in steps[1:]:
            if name == "Pooling":
                config = _read_json(module_dir / "config.json")
                modes = pooling_modes(config)
                if not modes or not set(modes) <= _POOLING_MODES:
                    raise ValueError(f"{module_dir / 'config.json'}: pooling {modes}; the ONNX encoder handles "
                                     f"{sorted(_POOLING_MODES)}")
                tail.append(("Pooling", (modes, config.get("include_prompt", True))))
            else:
                tail.append(("Normalize", None))
        if not tail or tail[0][0] != "Pooling":
            raise ValueError(f"{folder}: the {route} route has no Pooling module after its Transformer")
        layout[route] = (path, tail)
    return layout


def pooling_modes(config: dict) -> list[str]:
    """The modes of a Pooling config.json, the current ``pooling_mode`` or the older boolean flags."""
    modes = config.get("pooling_mode") or [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    return [modes] if isinstance(modes, str) else list(modes)


# ---- reading: onnxruntime + the folder's tokenizer ---------------------------------------------------------

class _Tower:
    """One Transformer module: its tokenizer, its max length per task, its onnxruntime session."""

    def __init__(self, path: Path, file_name: str, options, providers: list[str] | None):
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        config = transformer_config(path)
        onnx_file = path / "onnx" / file_name
        if not onnx_file.is_file():
            raise FileNotFoundError(f"{onnx_file} not found: export the folder with `rag-capg export --onnx`")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # sentence-transformers caps the tokenizer's length at the model's position table, unless the
        # folder names max_seq_length itself (the older config format); query_length / document_length
        # then override it per task.
        max_length = config.get("max_seq_length")
        if max_length is None:
            max_length = self.tokenizer.model_max_length
            positions = getattr(AutoConfig.from_pretrained(str(path)), "max_position_embeddings", -1)
            if isinstance(positions, int) and positions > 0:
                max_length = min(max_length, positions)
        self.max_length = {"query": config.get("query_length") or max_length,
                           "document": config.get("document_length") or max_length}
        self.session = ort.InferenceSession(str(onnx_file), options,
                                            providers=providers or ort.get_available_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.prompt_lengths: dict[str, int] = {}

    def prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt as sentence-transformers counts them: with the leading special token, without
        a trailing one."""
        if prompt not in self.prompt_lengths:
            ids = self.tokenizer([prompt])["input_ids"][0]
            self.prompt_lengths[prompt] = len(ids) - int(ids[-1] in self.tokenizer.all_special_ids)
        return self.prompt_lengths[prompt]

    def __call__(self, texts: list[str], task: Task) -> tuple[np.ndarray, np.ndarray]:
        batch = self.tokenizer(texts, padding=True, truncation="longest_first", max_length=self.max_length[task],
                               return_tensors="np")
        hidden = self.session.run(["last_hidden_state"],
                                  {name: batch[name].astype(np.int64) for name in self.input_names})[0]
        return hidden.astype(np.float32), batch["attention_mask"]


def pool(hidden: np.ndarray, attention_mask: np.ndarray, modes: Sequence[str], prompt_length: int = 0
         ) -> np.ndarray:
    """sentence-transformers' Pooling in numpy: (B, T, D) token states -> (B, D * len(modes)).

    A prompt excluded from pooling (include_prompt false) drops the first ``prompt_length`` real tokens:
    with left padding the positions before pad + prompt, with right padding the first ones."""
    mask = attention_mask.astype(np.float32)
    if prompt_length:
        first_real = attention_mask.argmax(axis=1)[:, None]
        mask = np.where(np.arange(mask.shape[1])[None, :] < first_real + prompt_length, 0.0, mask)
    out = []
    for mode in modes:
        if mode == "cls":  # the first position the mask keeps
            out.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
        elif mode == "max":
            out.append(np.where(mask[..., None] > 0, hidden, -np.inf).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens: the masked sum over the count (or its square root)
            count = np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
            total = (hidden * mask[..., None]).sum(axis=1)
            out.append(total / (count if mode == "mean" else np.sqrt(count)))
    return np.concatenate(out, axis=-1).astype(np.float32)


class OnnxEncoder:
    """``encode_query`` / ``encode_document`` of a sentence-transformers folder from its ONNX towers, with
    onnxruntime and each tower's tokenizer: what ``SentenceTransformer(folder).encode_query(...)`` returns, to
    float32 rounding (checked to 1e-4 by ``rag-capg export --onnx``), without torch weights.

    Handles a Transformer followed by Pooling (cls / max / mean / mean_sqrt_len_tokens, prompts in or out)
    and Normalize, alone or as both routes of a query/document Router, and the folder's query / document
    prompts; anything else raises ValueError when the encoder is built.

    Args:
        folder: a folder written by ``rag-capg export --onnx`` (any sentence-transformers folder whose
            Transformer modules hold ``onnx/<file_name>``).
        file_name: ``model.onnx`` (float32) or ``model_qint8_quantized.onnx`` (int8, ``--onnx-quantize``).
        num_threads: onnxruntime's intra-op threads (None: its default, one per core).
        providers: onnxruntime execution providers (None: every available one, best first).

    Example:
        >>> encoder = OnnxEncoder("models/scifact-capg")
        >>> queries = encoder.encode_query(["how do bees make honey?"])       # (1, dim) float32
        >>> documents = encoder.encode_document(["Bees turn nectar into honey."])
        >>> encoder.similarity(queries, documents)                           # (1, 1)
    """

    def __init__(self, folder: str | Path, file_name: str = ONNX_NAME, num_threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        towers: dict[Path, _Tower] = {}
        self.routes: dict[str, tuple[_Tower, list[tuple[str, object]]]] = {}
        for route, (path, tail) in read_layout(self.folder).items():
            if path not in towers:
                towers[path] = _Tower(path, file_name, options, providers)
            self.routes[route] = (towers[path], tail)
        config = _read_json(self.folder / "config_sentence_transformers.json")
        self.prompts: dict[str, str] = config.get("prompts") or {}
        self.default_prompt_name: str | None = config.get("default_prompt_name")
        self.similarity_fn_name: str = config.get("similarity_fn_name") or "cosine"

    def prompt(self, task: Task) -> str:
        """The prompt sentence-transformers prepends for ``encode_query`` / ``encode_document``."""
        for name in ("query",) if task == "query" else ("document", "passage", "corpus"):
            if name in self.prompts:
                return self.prompts[name] or ""
        return self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""

    def encode(self, texts: str | Sequence[str], task: Task, batch_size: int = 32) -> np.ndarray:
        """Embeddings (N, dim) float32, or (dim,) for one string; longest texts first in each batch, as
        sentence-transformers does, returned in the input order."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        tower, tail = self.routes[task]
        prompt = self.prompt(task)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = []
        for start in range(0, len(texts), batch_size):
            hidden, mask = tower([prompt + texts[i] for i in order[start:start + batch_size]], task)
            for name, params in tail:
                if name == "Pooling":
                    modes, include_prompt = params
                    emb = pool(hidden, mask, modes, 0 if include_prompt or not prompt else tower.prompt_length(prompt))
                else:  # Normalize: x / max(||x||, 1e-12), torch.nn.functional.normalize's eps
                    emb = emb / np.clip(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12, None)
            chunks.append(emb)
        out = np.empty_like(np.concatenate(chunks)) if chunks else np.zeros((0, 0), dtype=np.float32)
        out[order] = np.concatenate(chunks) if chunks else out
        return out[0] if single else out

    def encode_query(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.encode(texts, "query", batch_size)

    def encode_document(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.encode(texts, "document", batch_size)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) scores with the folder's similarity_fn_name (cosine or dot)."""
        a, b = np.atleast_2d(a), np.atleast_2d(b)
        if self.similarity_fn_name == "cosine":
            a = a / np.clip(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12, None)
            b = b / np.clip(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12, None)
        elif self.similarity_fn_name != "dot":
            raise ValueError(f"similarity {self.similarity_fn_name!r}: only cosine and dot are implemented here")
        return a @ b.T
