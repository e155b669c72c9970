"""Model-backed late-stage rankers: a cross-encoder, an LLM yes/no judge and a (larger) bi-encoder.

The natural score of each: CrossEncoderJudge a probability (sigmoid of the one logit, or softmax[1] of two);
LLMJudge P(yes) / (P(yes) + P(no)) of the next token after a prompt; BiEncoderTeacher a cosine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rag_capg.judges.base import model_name, pairs, short_hash


class CrossEncoderJudge:
    """sentence_transformers.CrossEncoder; score = sigmoid(logit) (1 label) or softmax(logits)[1] (2)."""

    def __init__(self, name_or_path: str | Path, *, batch_size: int = 32, device: str | None = None,
                 max_length: int | None = None):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_name(name_or_path), device=device, max_length=max_length)
        if self.model.num_labels not in (1, 2):
            raise ValueError(f"CrossEncoderJudge: {name_or_path} has {self.model.num_labels} labels; need 1 or 2")
        self.batch_size = batch_size
        self.identity = f"CrossEncoderJudge:{model_name(name_or_path)}:{short_hash(f'len={max_length}')}"

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        b, k = len(queries), len(passages[0]) if passages else 0
        logits = self.model.predict(pairs(queries, passages), batch_size=self.batch_size, convert_to_tensor=True,
                                    activation_fn=torch.nn.Identity(), show_progress_bar=False).float().cpu()
        probs = torch.sigmoid(logits.reshape(-1)) if self.model.num_labels == 1 else logits.softmax(-1)[:, 1]
        return probs.reshape(b, k)


DEFAULT_LLM_PROMPT = ("Judge whether the passage answers the query.\nQuery: {query}\nPassage: {passage}\n"
                      "Is the passage relevant to the query? Answer yes or no.\nAnswer:")


class LLMJudge:
    """A transformers causal LM as a yes/no judge: score = P(yes) / (P(yes) + P(no)) of the next token.

    Token choice: "yes" may be spelt by the model as " yes", "yes", " Yes" or "Yes"; every variant
    that the tokenizer encodes as ONE token counts (multi-token spellings are dropped), and P(yes)
    is the sum of their probabilities; the same for "no". Since both sums share the softmax
    normaliser, the score is sigmoid(logsumexp(logits[yes ids]) - logsumexp(logits[no ids])).
    ``yes_tokens`` / ``no_tokens`` override the variants; the chosen ids are in self.yes_ids/no_ids
    and in the identity. Batches are left-padded with explicit position ids, so padding does not
    change a pair's score. ``use_chat_template`` wraps the prompt as one user turn.
    """

    def __init__(self, name_or_path: str | Path, *, prompt_template: str = DEFAULT_LLM_PROMPT,
                 batch_size: int = 8, device: str | None = None, max_length: int = 512,
                 use_chat_template: bool = False, yes_tokens: tuple[str, ...] = (" yes", "yes", " Yes", "Yes"),
                 no_tokens: tuple[str, ...] = (" no", "no", " No", "No"), dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if "{query}" not in prompt_template or "{passage}" not in prompt_template:
            raise ValueError("LLMJudge: prompt_template must contain {query} and {passage}")
        name = model_name(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
        if device is not None:
            self.model.to(device)
        self.prompt_template, self.batch_size, self.max_length = prompt_template, batch_size, max_length
        self.use_chat_template = use_chat_template
        self.yes_ids, self.no_ids = self._single_token_ids(yes_tokens), self._single_token_ids(no_tokens)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("LLMJudge: yes and no tokens overlap")
        spec = json.dumps([prompt_template, use_chat_template, max_length, self.yes_ids, self.no_ids, str(dtype)])
        self.identity = f"LLMJudge:{name}:{short_hash(spec)}"

    def _single_token_ids(self, variants: tuple[str, ...]) -> list[int]:
        ids = []
        for v in variants:
            enc = self.tokenizer(v, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise ValueError(f"LLMJudge: none of {variants} is a single token for this tokenizer")
        return ids

    def prompt(self, query: str, passage: str) -> str:
        text = self.prompt_template.format(query=query, passage=passage)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def prompt_ids(self, query: str, passage: str) -> list[int]:
        """Token ids of the prompt, BOS first when the tokenizer has one (no EOS/SEP at the end: the
        next token is the answer). Over max_length, the PASSAGE is cut, never the question at the end."""
        enc = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        ids = enc(self.prompt(query, passage))
        if len(ids) > self.max_length - 1:
            budget = max(0, self.max_length - 1 - len(enc(self.prompt(query, ""))))
            ids = enc(self.prompt(query, self.tokenizer.decode(enc(passage)[:budget])))[-(self.max_length - 1):]
        bos = self.tokenizer.bos_token_id
        return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids

    @torch.no_grad()
    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        b, k = len(queries), len(passages[0]) if passages else 0
        prompts = [self.prompt_ids(q, p) for q, p in pairs(queries, passages)]
        dev, out = self.model.device, []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer.pad({"input_ids": prompts[i:i + self.batch_size]}, padding=True, return_tensors="pt")
            ids, att = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            pos = (att.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's first real token is position 0
            logits = self.model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1]
            logits = logits.float()
            # P(yes) / (P(yes) + P(no)): the softmax normaliser cancels, leaving a sigmoid of log-odds
            lyes, lno = logits[:, self.yes_ids].logsumexp(-1), logits[:, self.no_ids].logsumexp(-1)
            out.append(torch.sigmoid(lyes - lno).cpu())
        return torch.cat(out).reshape(b, k) if out else torch.zeros(b, k)


class BiEncoderTeacher:
    """A (larger) sentence-transformers model as the judge: cosine(encode_query(q), encode_document(p)).
    Passage embeddings are kept in memory by passage id and query embeddings by query text: a teacher sees
    the same passages and queries again, and ScoreCache sends its misses as one row per (query, passage)
    pair, so one query can fill K rows of a call (it is encoded once, not K times)."""

    def __init__(self, model_or_path, *, batch_size: int = 32, device: str | None = None):
        from rag_capg.retrieval.retriever import load_bi_encoder, model_fingerprint

        self.model = load_bi_encoder(str(model_or_path), device=device) if isinstance(model_or_path, (str, Path)) \
            else model_or_path
        self.batch_size = batch_size
        self.identity = f"BiEncoderTeacher:{model_fingerprint(self.model, route='all')}"
        self._doc: dict[str, torch.Tensor] = {}
        self._query: dict[str, torch.Tensor] = {}

    def add_passage_embeddings(self, passage_ids, embeddings: torch.Tensor) -> None:
        """Hand over passage vectors computed elsewhere, e.g. a whole corpus encoded once through
        retriever.encode_corpus's disk cache. They must be this model's normalised encode_document output."""
        if len(passage_ids) != len(embeddings):
            raise ValueError(f"{len(passage_ids)} passage ids but {len(embeddings)} embeddings")
        self._doc.update(zip(passage_ids, torch.as_tensor(embeddings).float().cpu()))

    @torch.no_grad()
    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        new = {pid: text for ids, texts in zip(passage_ids, passages) for pid, text in zip(ids, texts)
               if pid not in self._doc}
        if new:
            emb = self.model.encode_document(list(new.values()), batch_size=self.batch_size, convert_to_tensor=True,
                                             normalize_embeddings=True, show_progress_bar=False).float().cpu()
            self._doc.update(zip(new.keys(), emb))
        new_q = list(dict.fromkeys(text for text in queries if text not in self._query))
        if new_q:
            emb = self.model.encode_query(new_q, batch_size=self.batch_size, convert_to_tensor=True,
                                          normalize_embeddings=True, show_progress_bar=False).float().cpu()
            self._query.update(zip(new_q, emb))
        q = torch.stack([self._query[text] for text in queries])
        d = torch.stack([torch.stack([self._doc[p] for p in ids]) for ids in passage_ids])
        return torch.einsum("bd,bkd->bk", q, d)


