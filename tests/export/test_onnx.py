"""OnnxEncoder against sentence-transformers itself: one ONNX export of a tiny random BERT, read back under
the pooling modes, prompts (kept in or left out of the pooling) and Normalize that sentence-transformers
saves, each compared with that model's own encode_query / encode_document; layouts it does not implement
are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize
from sentence_transformers.sentence_transformer.modules import Dense, Pooling

from rag_capg.export.onnx import INT8_NAME, ONNX_NAME, OnnxEncoder, pool, read_layout
from rag_capg.export.onnx_export import CHECK_TEXTS, export_towers

PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="module")
def onnx_dir(tiny_bi_encoder_path, tmp_path_factory) -> Path:
    """The tiny bi-encoder's transformer exported once (float32 and int8); variants copy its onnx/ folder."""
    folder = tmp_path_factory.mktemp("onnx") / "plain"
    model = SentenceTransformer(str(tiny_bi_encoder_path), device="cpu")
    model.save(str(folder))
    assert export_towers(folder, model, quantize=True) == [f"onnx/{ONNX_NAME}", f"onnx/{INT8_NAME}"]
    return folder / "onnx"


def variant(base_path: Path, onnx_dir: Path, out: Path, *extra, prompts=None, default_prompt_name=None,
            **pooling) -> tuple[SentenceTransformer, Path]:
    """The tiny model's Transformer with another Pooling (and modules after it), saved by sentence-transformers
    with the exported ONNX file copied in."""
    transformer = SentenceTransformer(str(base_path), device="cpu")[0]
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), **pooling), *extra]
    model = SentenceTransformer(modules=modules, device="cpu", prompts=prompts,
                                default_prompt_name=default_prompt_name)
    model.save(str(out))
    shutil.copytree(onnx_dir, out / "onnx")
    return model, out


@pytest.mark.parametrize("pooling_mode, include_prompt, normalize", [
    ("mean", False, True), ("cls", False, False), ("max", False, True), ("mean_sqrt_len_tokens", True, False),
    (["cls", "mean"], False, False),
])
def test_encoder_matches_sentence_transformers(tiny_bi_encoder_path, onnx_dir, tmp_path, pooling_mode,
                                               include_prompt, normalize):
    model, folder = variant(tiny_bi_encoder_path, onnx_dir, tmp_path / "m", *([Normalize()] if normalize else []),
                            prompts=PROMPTS, pooling_mode=pooling_mode, include_prompt=include_prompt)
    encoder = OnnxEncoder(folder)
    texts = list(CHECK_TEXTS)
    for task, want in (("query", model.encode_query(texts)), ("document", model.encode_document(texts))):
        np.testing.assert_allclose(encoder.encode(texts, task), want, atol=1e-5)
        np.testing.assert_allclose(encoder.encode(texts, task, batch_size=3), want, atol=1e-5)
        np.testing.assert_allclose(encoder.encode(texts[1], task), want[1], atol=1e-5)  # one string: (dim,)
        # the prompt is there: without it the embeddings move
        assert np.abs(model.encode(texts[:3]) - want[:3]).max() > 1e-3
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(encoder.encode_query(texts), axis=1), 1.0, atol=1e-5)


def test_default_prompt_and_int8(tiny_bi_encoder_path, onnx_dir, tmp_path):
    model, folder = variant(tiny_bi_encoder_path, onnx_dir, tmp_path / "m", prompts={"classify": "topic: "},
                            default_prompt_name="classify", pooling_mode="mean", include_prompt=False)
    texts = list(CHECK_TEXTS)
    want = model.encode_document(texts)
    np.testing.assert_allclose(OnnxEncoder(folder).encode_document(texts), want, atol=1e-5)
    int8 = OnnxEncoder(folder, file_name=INT8_NAME).encode_document(texts)
    assert 1e-6 < np.abs(int8 - want).max() < 0.2  # a different file, close to the float32 one


def test_pool_by_hand():
    """Right padding, a two-token prompt left out: mean, max and cls over the kept positions only."""
    hidden = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    np.testing.assert_allclose(pool(hidden, mask, ["mean"]), [[3.0, 4.0], [12.0, 13.0]])
    np.testing.assert_allclose(pool(hidden, mask, ["mean"], prompt_length=2), [[5.0, 6.0], [14.0, 15.0]])
    np.testing.assert_allclose(pool(hidden, mask, ["max", "cls"], prompt_length=2),
                               [[6.0, 7.0, 4.0, 5.0], [14.0, 15.0, 14.0, 15.0]])
    left = np.array([[0, 1, 1, 1, 1]])  # left padding: the prompt starts at the first real token
    np.testing.assert_allclose(pool(hidden[:1], left, ["mean"], prompt_length=1), [[6.0, 7.0]])  # 2, 3, 4


def test_unsupported_layouts_are_refused_by_name(tiny_bi_encoder_path, onnx_dir, tmp_path):
    transformer = SentenceTransformer(str(tiny_bi_encoder_path), device="cpu")[0]
    dense = Dense(transformer.get_embedding_dimension(), 8)
    _, folder = variant(tiny_bi_encoder_path, onnx_dir, tmp_path / "dense", dense, pooling_mode="mean")
    with pytest.raises(ValueError, match=r"\['Transformer', 'Pooling', 'Dense'\]"):
        read_layout(folder)
    _, folder = variant(tiny_bi_encoder_path, onnx_dir, tmp_path / "last", pooling_mode="lasttoken")
    with pytest.raises(ValueError, match="pooling \\['lasttoken'\\]"):
        OnnxEncoder(folder)
    shutil.rmtree(folder / "onnx")
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    config["pooling_mode"] = "mean"
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="rag-capg export --onnx"):
        OnnxEncoder(folder)
