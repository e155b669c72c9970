"""Model-backed late-stage rankers: a cross-encoder, an LLM yes/no judge and a (larger) bi-encoder.

The natural score of each: CrossEncoderJudge a probability (sigmoid of the one logit, or softmax[1] of two);
LLMJudge P(yes) / (P(yes) + P(no)) of the next token after a prompt; BiEncoderTeacher a cosine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from rag_capg.judges.base import model_name, pairs, short_hash

JudgeDtype = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_dtype(dtype: JudgeDtype | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on a GPU that has it (float16 on one that has not) and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class CrossEncoderJudge:
    """sentence_transformers.CrossEncoder; score = sigmoid(logit) (1 label) or softmax(logits)[1] (2).

    ``dtype``: the encoder runs under ``torch.autocast`` in bfloat16 / float16 (weights stay float32; "auto":
    bfloat16 on a GPU, float32 on a CPU), and its last linear layer, the one that outputs the logits, in
    float32, so that the score is not rounded to 16 bits (sentence-transformers' keep_in_fp32_modules).
    """

    def __init__(self, name_or_path: str | Path, *, batch_size: int = 32, device: str | None = None,
                 max_length: int | None = None, dtype: JudgeDtype | torch.dtype = "auto"):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(model_name(name_or_path), device=device, max_length=max_length)
        if self.model.num_labels not in (1, 2):
            raise ValueError(f"CrossEncoderJudge: {name_or_path} has {self.model.num_labels} labels; need 1 or 2")
        self.batch_size = batch_size
        self.dtype = resolve_dtype(dtype, self.model.device)
        spec = f"len={max_length}" + ("" if self.dtype == torch.float32 else f":dtype={self.dtype}")
        self.identity = f"CrossEncoderJudge:{model_name(name_or_path)}:{short_hash(spec)}"
        if self.dtype != torch.float32:
            # the logits layer: the last plain Linear with one output per label (classifier, out_proj, ...)
            heads = [name for name, m in self.model.named_modules()
                     if type(m) is torch.nn.Linear and m.out_features == self.model.num_labels]
            if heads:
                self.model.set_keep_in_fp32_modules(heads[-1:])

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        b, k = len(queries), len(passages[0]) if passages else 0
        autocast = torch.autocast(self.model.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            logits = self.model.predict(pairs(queries, passages), batch_size=self.batch_size,
                                        convert_to_tensor=True, activation_fn=torch.nn.Identity(),
                                        show_progress_bar=False).float().cpu()
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

    Precision: the yes/no logits are computed in float32 from the final hidden state and the yes/no rows
    of the LM head only (``yes_no_logits``): in bfloat16, logits of 16-32 are spaced 0.125 apart, so
    reading the model's own bf16 logits moved P(yes) in steps of up to ~3% and tied candidates. The
    hidden state itself stays in the model's dtype. Heads that post-process their logits (Gemma's soft
    cap, Cohere's logit_scale, Granite's logits_scaling, read from the config) are followed; any other
    mismatch with the model's own logits, found by a probe at load time, falls back to them (a warning).

    Throughput: the pairs of a call are tokenised in one batched tokenizer call, sorted by length into
    batches (little padding; the scores come back in the caller's order), and scored without a KV cache;
    the model is loaded straight onto ``device`` in ``dtype``.
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
        # straight onto its device and dtype: not built on the CPU and then moved (once per process)
        self.model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, **({"device_map": {"": str(device)}} if device is not None else {})).eval()
        self.prompt_template, self.batch_size, self.max_length = prompt_template, batch_size, max_length
        self.use_chat_template = use_chat_template
        self.yes_ids, self.no_ids = self._single_token_ids(yes_tokens), self._single_token_ids(no_tokens)
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("LLMJudge: yes and no tokens overlap")
        self._head = self._yes_no_head()
        spec = json.dumps([prompt_template, use_chat_template, max_length, self.yes_ids, self.no_ids, str(dtype),
                           "head=" + ("float32" if self._head is not None else "model")])
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

    # ---------------------------------------------------------------------------------------- prompts
    def prompt(self, query: str, passage: str) -> str:
        text = self.prompt_template.format(query=query, passage=passage)
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def prompt_ids(self, query: str, passage: str) -> list[int]:
        """Token ids of the prompt, BOS first when the tokenizer has one (no EOS/SEP at the end: the
        next token is the answer). Over max_length, the PASSAGE is cut, never the question at the end."""
        return self.encode_pairs([(query, passage)])[0]

    def encode_pairs(self, query_passage: list[tuple[str, str]]) -> list[list[int]]:
        """``prompt_ids`` of many pairs, in one batched tokenizer call. A prompt over max_length is cut inside
        its passage: with a fast tokenizer, by dropping passage tokens of that same tokenisation (found by
        their character offsets; the template's tokens are kept as they were); otherwise by re-tokenising
        the prompt around the passage cut to its budget."""
        tok, budget = self.tokenizer, self.max_length - 1  # one slot for BOS
        texts = [self.prompt(q, p) for q, p in query_passage]
        fast = bool(getattr(tok, "is_fast", False))
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=fast)
        out = []
        for n, (text, ids) in enumerate(zip(texts, enc["input_ids"])):
            if len(ids) > budget:
                query, passage = query_passage[n]
                span = self._passage_span(query, passage, text) if fast else None
                ids = self._cut(ids, enc["offset_mapping"][n], span) if span else self._cut_slow(query, passage)
                ids = ids[-budget:]  # a template longer than the budget on its own: keep its end
            bos = tok.bos_token_id
            out.append([bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids)
        return out

    def _passage_span(self, query: str, passage: str, text: str) -> tuple[int, int] | None:
        """(start, end) characters of the passage in the prompt text, or None if the template changed it."""
        marker = "\x00"
        parts = self.prompt(query, marker).split(marker)
        if len(parts) != 2 or parts[0] + passage + parts[1] != text:
            return None
        return len(parts[0]), len(parts[0]) + len(passage)

    def _cut(self, ids: list[int], offsets, span: tuple[int, int]) -> list[int]:
        """Drop passage tokens from the end of the passage until the prompt fits (token starts decide)."""
        start = sum(1 for a, _ in offsets if a < span[0])  # template and query before the passage
        end = start + sum(1 for a, _ in offsets[start:] if a < span[1])  # the passage's tokens
        keep = max(0, self.max_length - 1 - (len(ids) - (end - start)))
        return ids[:start + min(keep, end - start)] + ids[end:]

    def _cut_slow(self, query: str, passage: str) -> list[int]:
        enc = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        keep = max(0, self.max_length - 1 - len(enc(self.prompt(query, ""))))
        return enc(self.prompt(query, self.tokenizer.decode(enc(passage)[:keep])))

    # ---------------------------------------------------------------------------------------- the head
    def _yes_no_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W, b): the yes-then-no rows of the LM head in float32, or None when a probe prompt shows the
        model's logits are not (a known transform of) hidden_state @ W.T + b: then its own logits are read."""
        head = self.model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.dim() != 2:
            return None
        rows = torch.tensor(self.yes_ids + self.no_ids, device=weight.device)
        bias = getattr(head, "bias", None)
        self._head = (weight.detach()[rows].float(), None if bias is None else bias.detach()[rows].float())
        ids = self.encode_pairs([("a probe query", "a probe passage")])
        with torch.no_grad():
            ours, theirs = self._forward(ids, own_logits=True)
        theirs = theirs.float()
        scale = max(1.0, float(theirs.abs().max()))
        # bf16 / fp16 logits are rounded to 2^-8 / 2^-11 relative; a different head is off by far more
        tol = scale * (4 * torch.finfo(self.model.dtype).eps + 1e-4)
        if not bool(((ours - theirs).abs() <= tol).all()):
            import warnings

            warnings.warn(f"LLMJudge: the yes/no logits of {type(self.model).__name__} are not its LM head's "
                          "rows applied to the last hidden state; reading the model's own logits instead", stacklevel=3)
            return None
        return self._head

    def _post_process(self, logits: torch.Tensor) -> torch.Tensor:
        """The transforms causal-LM heads apply after the matmul, read from the (text) config."""
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        if getattr(cfg, "logit_scale", None) is not None and "cohere" in str(getattr(cfg, "model_type", "")):
            logits = logits * cfg.logit_scale
        if getattr(cfg, "logits_scaling", None):
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits

    def _forward(self, prompts: list[list[int]], *, own_logits: bool = False):
        """(yes-then-no logits (n, Y + N) float32) for prompts of one batch; with own_logits, also the
        model's own logits at those ids (for the load-time probe)."""
        enc = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        dev = self.model.device
        ids, att = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's first real token is position 0
        rows = self.yes_ids + self.no_ids
        hidden = []
        hook = None
        if self._head is not None:  # the LM head's input at the last position: the final hidden state
            hook = self.model.get_output_embeddings().register_forward_hook(
                lambda module, args, output: hidden.append(args[0][:, -1]))
        try:
            logits = self.model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1,
                                use_cache=False).logits[:, -1, rows]
        finally:
            if hook is not None:
                hook.remove()
        if self._head is None:
            return logits.float()
        weight, bias = self._head
        ours = hidden[0].float() @ weight.T.to(hidden[0].device)  # float32: no rounding of the logits
        if bias is not None:
            ours = ours + bias.to(ours.device)
        ours = self._post_process(ours)
        return (ours, logits) if own_logits else ours

    @torch.no_grad()
    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        b, k = len(queries), len(passages[0]) if passages else 0
        prompts = self.encode_pairs(pairs(queries, passages))
        # longest first (an out-of-memory shows on the first batch), so a batch pads to similar lengths
        order = sorted(range(len(prompts)), key=lambda n: -len(prompts[n]))
        scores = torch.empty(len(prompts))
        y = len(self.yes_ids)
        for i in range(0, len(order), self.batch_size):
            batch = order[i:i + self.batch_size]
            logits = self._forward([prompts[n] for n in batch])
            # P(yes) / (P(yes) + P(no)): the softmax normaliser cancels, leaving a sigmoid of log-odds
            lyes, lno = logits[:, :y].logsumexp(-1), logits[:, y:].logsumexp(-1)
            scores[batch] = torch.sigmoid(lyes - lno).cpu()
        return scores.reshape(b, k)


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


