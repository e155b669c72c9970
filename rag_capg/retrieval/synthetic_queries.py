"""Training queries made from the corpus itself, for a user with passages and no queries at all.

The judge (a model LSR, ``lsr=ensemble`` say) provides the reward as usual; these queries only give the policy
something to search for, so they carry no labels.

- ``inverse_cloze_queries``: the inverse cloze task of ORQA (Lee et al., 2019): a sentence of a passage is a
  query, its passage the context it came from. ORQA removed the sentence from the context 90% of the time so
  that matching needs more than word overlap. Here the passage stays as it is in the corpus, WITH its
  sentence: the index, the judge and the evaluation all see one corpus, and no query is ever paired with a
  label (the judge decides what is relevant, and may prefer another passage). So a lexical judge will
  usually rank the source passage first; a semantic judge need not.
- ``generated_queries``: a transformers causal LM writes one question per passage (greedy decoding, so the
  same model, corpus and seed give the same queries); its chat template wraps the prompt when it has one.

Both pick passages in a seeded random order, one query per passage, and name each query after its source
(``ict:<passage id>:<sentence>``, ``gen:<passage id>``).
"""

from __future__ import annotations

import random
import re

import torch

from rag_capg.errors import InputError
from rag_capg.retrieval.data import Corpus, QuerySet

# a sentence ends at . ! or ? followed by white space and an upper-case letter, digit or opening quote/bracket
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
DEFAULT_GENERATOR_PROMPT = ("Passage: {passage}\nWrite one short search query that this passage answers.\n"
                            "Query:")


def split_sentences(text: str) -> list[str]:
    """A passage's sentences (a regular-expression splitter: no abbreviation list, good enough for prose)."""
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


def _passage_order(corpus: Corpus, seed: int) -> list[int]:
    order = list(range(len(corpus)))
    random.Random(seed).shuffle(order)
    return order


def inverse_cloze_queries(corpus: Corpus, num_queries: int, *, seed: int = 0, min_words: int = 4,
                          max_words: int = 64, split: str = "corpus_ict") -> QuerySet:
    """Up to ``num_queries`` unlabelled queries, each a sentence of a different passage (inverse cloze task).

    A passage qualifies when it has at least two sentences and one of them has ``min_words`` words or more (a
    passage of one sentence would make the query the whole passage); one such sentence is drawn uniformly and
    cut to ``max_words`` words. Passages are visited in a seeded random order, so a seed fixes the queries.

    Args:
        corpus: the passages.
        num_queries: how many queries (fewer when fewer passages qualify).
        seed: fixes the passages chosen and the sentence of each.
        min_words, max_words: the sentence's length bounds (in white-space separated words).

    Example:
        >>> queries = inverse_cloze_queries(corpus, 1000, seed=0)
        >>> queries.ids[0], queries.texts[0]   # ('ict:4983:2', 'The plasma ... was measured in 12 patients.')
    """
    if num_queries < 1:
        raise InputError(f"must be >= 1, got {num_queries}", field="num_synthetic_queries")
    rng = random.Random(seed + 1)
    ids, texts = [], []
    for j in _passage_order(corpus, seed):
        sentences = split_sentences(corpus.texts[j])
        eligible = [i for i, s in enumerate(sentences) if len(s.split()) >= min_words]
        if len(sentences) < 2 or not eligible:
            continue
        i = rng.choice(eligible)
        ids.append(f"ict:{corpus.ids[j]}:{i}")
        texts.append(" ".join(sentences[i].split()[:max_words]))
        if len(ids) == num_queries:
            break
    if not ids:
        raise InputError(f"no passage of the corpus has two sentences with >= {min_words} words: the inverse cloze "
                         "task has nothing to ask (give queries, or train_queries=corpus_generated with a "
                         "query_generator_model)", field="train_queries")
    return QuerySet(ids=ids, texts=texts, qrels={q: {} for q in ids}, split=split)


@torch.no_grad()
def generated_queries(corpus: Corpus, num_queries: int, generator: str, *, seed: int = 0,
                      prompt: str = DEFAULT_GENERATOR_PROMPT, max_new_tokens: int = 32, max_passage_tokens: int = 384,
                      batch_size: int = 8, device: str | None = None, split: str = "corpus_generated") -> QuerySet:
    """Up to ``num_queries`` unlabelled queries, one per passage, written by a causal LM (greedy decoding).

    Args:
        corpus: the passages.
        num_queries: how many passages to ask about (a passage whose generated text is empty is skipped).
        generator: a transformers causal LM: Hub id, local folder or ``package:NAME``.
        seed: fixes which passages are used (the decoding itself is greedy, deterministic).
        prompt: with ``{passage}``; the text generated up to the first line break is the query.
        max_passage_tokens: a longer passage is cut to this many tokens inside the prompt.

    Example:
        >>> queries = generated_queries(corpus, 500, "Qwen/Qwen2.5-0.5B-Instruct", seed=0)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_capg.judges.base import model_name
    from rag_capg.retrieval.retriever import resolve_model

    if num_queries < 1:
        raise InputError(f"must be >= 1, got {num_queries}", field="num_synthetic_queries")
    if "{passage}" not in prompt:
        raise ValueError("generated_queries: the prompt must contain {passage}")
    name = model_name(resolve_model(generator))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name).eval()
    except (OSError, ValueError) as err:
        raise InputError(f"could not load the query generator: {err}", field="query_generator_model") from None
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def build(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_passage_tokens]
        body = prompt.format(passage=tokenizer.decode(ids))
        if getattr(tokenizer, "chat_template", None):
            body = tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                 add_generation_prompt=True)
        return body

    chosen = _passage_order(corpus, seed)[:num_queries]
    ids, texts = [], []
    for start in range(0, len(chosen), batch_size):
        part = chosen[start:start + batch_size]
        enc = tokenizer([build(corpus.texts[j]) for j in part], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        for j, row in zip(part, out[:, enc["input_ids"].shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip()
            if text:
                ids.append(f"gen:{corpus.ids[j]}")
                texts.append(text)
    if not ids:
        raise InputError("the query generator wrote nothing for any passage", field="query_generator_model")
    return QuerySet(ids=ids, texts=texts, qrels={q: {} for q in ids}, split=split)
