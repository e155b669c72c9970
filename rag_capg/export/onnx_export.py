"""Writing the ONNX towers of an exported folder (``rag-capg export --onnx``): ``torch.onnx.export`` of each
Transformer module into ``<module folder>/onnx/model.onnx``, optionally onnxruntime's dynamic int8 copy,
then the check of ``OnnxEncoder`` (rag_capg.export.onnx) against the torch model and a timing of both.

The dynamo exporter is used: the TorchScript one traced BERT's SDPA attention mask as a constant here
(hidden states off by ~1.4 for texts of another length than the traced one).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from rag_capg.export.onnx import INT8_NAME, ONNX_NAME, OnnxEncoder, module_pipelines

OPSET = 20
_TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# The texts the export checks ONNX against torch on: ordinary ones, an empty one, whitespace, one far past
# any max_seq_length (so truncation is exercised), CJK, Cyrillic + Arabic + an emoji (an [UNK] for BERT).
CHECK_TEXTS = ["why do cats purr?", "Bees turn nectar into honey in the hive.", "a b c", "",
               " ".join(["Copper conducts electricity well because its outer electron moves freely."] * 80),
               "银河系中有数千亿颗恒星。東京の天気は晴れです。", "Привет, как дела? مرحبا بالعالم 👋", "   "]
# The texts timed: the short check texts over and over, like a batch of queries.
TIMED_TEXTS = 256


def export_transformer(transformer, path: Path, opset: int = OPSET) -> None:
    """A sentence-transformers Transformer module's model as ONNX at ``path``: the tokenizer's inputs in,
    ``last_hidden_state`` out, batch and sequence dynamic. Weights over 1.5 GiB go to an external data file
    (a protobuf holds 2 GiB at most)."""
    import torch

    model, tokenizer = transformer.auto_model, transformer.tokenizer
    names = [n for n in _TOKENIZER_INPUTS if n in tokenizer.model_input_names]
    extra = set(tokenizer.model_input_names) - set(_TOKENIZER_INPUTS)
    if extra or "input_ids" not in names:
        raise ValueError(f"tokenizer inputs {tokenizer.model_input_names}; the ONNX export handles {_TOKENIZER_INPUTS}")

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            kwargs = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, **{k: v for k, v in kwargs.items() if k in names}
                              ).last_hidden_state

    # Two texts of different lengths, so both axes are traced as sizes > 1 with padding present.
    sample = tokenizer(["a sample text to trace the exporter with", "short"], padding=True, return_tensors="pt")
    dynamic = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in names}
    wrapper = LastHiddenState().eval()
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (), kwargs={n: sample[n] for n in names}, dynamo=True,
                                    opset_version=opset, output_names=["last_hidden_state"],
                                    dynamic_shapes=dynamic, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=size > 1.5 * 2**30)


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization of the MatMul weights, one scale per output channel
    (activations are quantized on the fly; embeddings and LayerNorm stay float32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its "consider pre-processing" hint: shape inference fails on dynamo graphs
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], use_external_data_format=source.stat().st_size > 2**31)
    finally:
        logging.disable(logging.NOTSET)


def torch_modules(model, route: str) -> list:
    """The torch modules of one route of a SentenceTransformer, in module_pipelines' order."""
    from sentence_transformers.base.modules import Router

    mods = list(model.children())
    if mods and isinstance(mods[0], Router):
        return list(mods[0].sub_modules[route]) + mods[1:]
    return mods


def export_towers(folder: Path, model, *, quantize: bool = False, opset: int = OPSET) -> list[str]:
    """Write ``onnx/model.onnx`` (and with ``quantize`` ``onnx/model_qint8_quantized.onnx``) into every
    Transformer module folder of ``folder``, the saved copy of ``model``. Returns the files written."""
    written, done = [], set()
    for route, steps in module_pipelines(folder).items():
        path, transformer = steps[0][1], torch_modules(model, route)[0]
        if path in done:
            continue  # a plain model: one tower for both routes
        done.add(path)
        export_transformer(transformer, path / "onnx" / ONNX_NAME, opset)
        written.append(path / "onnx" / ONNX_NAME)
        if quantize:
            quantize_int8(path / "onnx" / ONNX_NAME, path / "onnx" / INT8_NAME)
            written.append(path / "onnx" / INT8_NAME)
    return [p.relative_to(folder).as_posix() for p in written]


def compare(encoder: OnnxEncoder, reference: dict[str, np.ndarray], texts: list[str]) -> tuple[float, float]:
    """(max |ONNX - torch| over every component, min cosine) on ``texts`` encoded as one batch and one by one."""
    gap, cosine = 0.0, 1.0
    for task, want in reference.items():
        for got in (encoder.encode(texts, task), np.stack([encoder.encode(t, task) for t in texts])):
            gap = max(gap, float(np.abs(got - want).max()))
            num = (got * want).sum(-1)
            den = np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1)
            cosine = min(cosine, float((num / np.clip(den, 1e-12, None)).min()))
    return gap, cosine


def cpu_name() -> str:
    """The CPU model, for the figures' record (/proc/cpuinfo on Linux, else what platform knows)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def best_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def check_towers(folder: Path, model, *, atol: float, quantized: bool, min_cosine: float) -> dict:
    """Compare the ONNX towers with the torch ``model`` on CHECK_TEXTS (each route, as one batch and one text
    at a time), raise RuntimeError past ``atol`` (float32) or under ``min_cosine`` (int8), and time both on
    TIMED_TEXTS short texts with torch's thread count. Returns the figures for the model card."""
    import onnxruntime as ort
    import torch

    texts = list(CHECK_TEXTS)
    reference = {"query": model.encode_query(texts, batch_size=64, convert_to_numpy=True),
                 "document": model.encode_document(texts, batch_size=64, convert_to_numpy=True)}
    threads = torch.get_num_threads()
    files = {"float32": ONNX_NAME, **({"int8": INT8_NAME} if quantized else {})}
    encoders = {kind: OnnxEncoder(folder, name, num_threads=threads) for kind, name in files.items()}
    report: dict = {"opset": OPSET, "onnxruntime": ort.__version__, "texts": len(texts), "threads": threads,
                    "cpu": cpu_name(), "timed_texts": TIMED_TEXTS, "max_abs_diff": {}, "min_cosine": {},
                    "seconds": {}}
    tower = next(iter(encoders["float32"].routes.values()))[0]
    report["long_text_tokens"] = len(tower.tokenizer(CHECK_TEXTS[4], verbose=False)["input_ids"])
    report["max_seq_length"] = tower.max_length["query"]
    for kind, encoder in encoders.items():
        report["max_abs_diff"][kind], report["min_cosine"][kind] = compare(encoder, reference, texts)
    if report["max_abs_diff"]["float32"] > atol:
        raise RuntimeError(f"ONNX embeddings differ from torch by {report['max_abs_diff']['float32']:.2e} "
                           f"> onnx_atol={atol}")
    if quantized and report["min_cosine"]["int8"] < min_cosine:
        raise RuntimeError(f"int8 embeddings reach cosine {report['min_cosine']['int8']:.4f} with torch's, "
                           f"< onnx_min_cosine={min_cosine}")
    timed = ([t for t in texts if len(t) < 100] * TIMED_TEXTS)[:TIMED_TEXTS]
    report["seconds"]["torch"] = best_time(lambda: model.encode_query(timed, batch_size=32))
    for kind, encoder in encoders.items():
        report["seconds"][kind] = best_time(lambda e=encoder: e.encode_query(timed, batch_size=32))
    return report
