"""The late-stage ranker (LSR): frozen judges that score (query, passage) pairs, a cache, and rewards.

Every judge has ``identity: str`` (stable across runs; the cache key) and
``score(query_ids, queries, passage_ids, passages) -> FloatTensor (B, K)`` with queries (B) and
passage_ids / passages (B x K). The "natural" score per judge:

- CrossEncoderJudge: a probability (sigmoid of the one logit, or softmax[1] of two);
- LLMJudge: P(yes) / (P(yes) + P(no)) of the next token after a prompt;
- LabelOracle: the qrels grade (0 for unjudged); BiEncoderTeacher: a cosine; CallableJudge: anything.

ScoreCache wraps a judge: an sqlite table (judge, qid, pid, score) so a frozen LSR is asked about each
pair once per cache file, plus the failure policy (an exception, a timeout, NaN/inf or a wrong shape
is a JudgeError, or with "skip_query" the query is skipped and counted: never a silent zero reward).
pick() is the LSR policy over a candidate list; to_reward() maps scores to non-negative rewards.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Callable, Literal

import torch

FailurePolicy = Literal["error", "skip_query"]
PickPolicy = Literal["top", "sample"]
RewardMapping = Literal["identity", "clip", "sigmoid"]


class JudgeError(RuntimeError):
    """A judge raised, timed out or returned something that is not a finite (B, K) score matrix."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _name(name_or_path: str | Path) -> str:
    """A local path is identified by its absolute form (stable whatever the cwd); a Hub id as is."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.exists() else str(name_or_path)


def _pairs(queries: list[str], passages: list[list[str]]) -> list[tuple[str, str]]:
    return [(q, p) for q, row in zip(queries, passages) for p in row]


# ---------------------------------------------------------------------------------------- judges
class CrossEncoderJudge:
    """sentence_transformers.CrossEncoder; score = sigmoid(logit) (1 label) or softmax(logits)[1] (2)."""

    def __init__(self, name_or_path: str | Path, *, batch_size: int = 32, device: str | None = None,
                 max_length: int | None = None):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(_name(name_or_path), device=device, max_length=max_length)
        if self.model.num_labels not in (1, 2):
            raise ValueError(f"CrossEncoderJudge: {name_or_path} has {self.model.num_labels} labels; need 1 or 2")
        self.batch_size = batch_size
        self.identity = f"CrossEncoderJudge:{_name(name_or_path)}:{_sha(f'len={max_length}')}"

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        b, k = len(queries), len(passages[0]) if passages else 0
        logits = self.model.predict(_pairs(queries, passages), batch_size=self.batch_size, convert_to_tensor=True,
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
        name = _name(name_or_path)
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
        self.identity = f"LLMJudge:{name}:{_sha(spec)}"

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
        prompts = [self.prompt_ids(q, p) for q, p in _pairs(queries, passages)]
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


class LabelOracle:
    """Graded qrels as the judge: score = grade, 0 for unjudged pairs (qrels: qid -> {pid: grade})."""

    def __init__(self, qrels: dict[str, dict[str, int]]):
        self.qrels = qrels
        self.identity = f"LabelOracle:{_sha(json.dumps(qrels, sort_keys=True))}"

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        return torch.tensor([[float(self.qrels.get(q, {}).get(p, 0)) for p in row]
                             for q, row in zip(query_ids, passage_ids)], dtype=torch.float32)


class BiEncoderTeacher:
    """A (larger) sentence-transformers model as the judge: cosine(encode_query(q), encode_document(p)).
    Passage embeddings are kept in memory by passage id and query embeddings by query text: a teacher sees
    the same passages and queries again, and ScoreCache sends its misses as one row per (query, passage)
    pair, so one query can fill K rows of a call (it is encoded once, not K times)."""

    def __init__(self, model_or_path, *, batch_size: int = 32, device: str | None = None):
        from rag_capg.retriever import load_bi_encoder, model_fingerprint

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


class CallableJudge:
    """Any fn(query_ids, queries, passage_ids, passages) -> array-like (B, K); ``identity`` is yours
    to keep stable (it keys the cache). ``timeout`` (seconds) bounds each call (a thread is used; a
    timed-out call is abandoned, not killed) and raises JudgeError."""

    def __init__(self, fn: Callable, identity: str, *, timeout: float | None = None):
        self.fn, self.identity, self.timeout = fn, identity, timeout

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        if self.timeout is None:
            return torch.as_tensor(self.fn(query_ids, queries, passage_ids, passages), dtype=torch.float32)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            fut = pool.submit(self.fn, query_ids, queries, passage_ids, passages)
            return torch.as_tensor(fut.result(timeout=self.timeout), dtype=torch.float32)
        except concurrent.futures.TimeoutError:
            raise JudgeError(f"judge {self.identity!r} timed out after {self.timeout} s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------- cache
class ScoreCache:
    """On-disk scores of a frozen judge, keyed by (judge identity, query id, passage id), plus the
    failure policy. ``path=None`` keeps the cache in memory (policy only).

    Only misses go to the judge, flattened into rows of one pair (B' x 1) so any mix of hits and
    misses batches fully. A failing call is an error under "error"; under "skip_query" the misses
    are re-sent one query at a time to find the culprits, and a query whose call raises, times out
    or gives a non-finite score is skipped: its row is NaN in score() and True in the mask of
    score_with_skips(), and stats()["skipped_queries"] counts it. Nothing invalid is ever cached.
    sqlite in WAL mode lets several training processes share one file.
    """

    def __init__(self, judge, path: str | Path | None, *, on_failure: FailurePolicy = "error",
                 timeout: float | None = None):
        if on_failure not in ("error", "skip_query"):
            raise ValueError(f"on_failure must be 'error' or 'skip_query', got {on_failure!r}")
        self.judge, self.identity, self.on_failure, self.timeout = judge, judge.identity, on_failure, timeout
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(":memory:" if path is None else str(path), timeout=60)
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (judge TEXT, qid TEXT, pid TEXT, score REAL, "
                        "PRIMARY KEY (judge, qid, pid)) WITHOUT ROWID")
        self.db.commit()
        self.hits = self.misses = self.judge_calls = self.skipped_queries = 0

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "judge_calls": self.judge_calls, "skipped_queries": self.skipped_queries}

    def score(self, query_ids, queries, passage_ids, passages) -> torch.Tensor:
        return self.score_with_skips(query_ids, queries, passage_ids, passages)[0]

    def score_with_skips(self, query_ids, queries, passage_ids, passages) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, K), skipped (B,) bool). Skipped rows are NaN, so misuse fails loudly downstream."""
        b, k = len(query_ids), len(passage_ids[0]) if passage_ids else 0
        if any(len(row) != k for row in passage_ids) or len(passages) != b or len(queries) != b:
            raise ValueError("ScoreCache: queries, passage_ids and passages must be B and B x K")
        out = torch.full((b, k), math.nan)
        known: dict[tuple[str, str], float] = {}
        for q in set(query_ids):
            for pid, s in self.db.execute("SELECT pid, score FROM scores WHERE judge=? AND qid=?", (self.identity, q)):
                known[(q, pid)] = s
        miss: list[tuple[int, int]] = []
        for i, (q, row) in enumerate(zip(query_ids, passage_ids)):
            for j, pid in enumerate(row):
                if (q, pid) in known:
                    out[i, j] = known[(q, pid)]
                else:
                    miss.append((i, j))
        self.hits += b * k - len(miss)
        self.misses += len(miss)
        skipped = torch.zeros(b, dtype=torch.bool)
        if miss:
            try:
                got = self._call(miss, query_ids, queries, passage_ids, passages)
            except JudgeError:
                if self.on_failure == "error":
                    raise
                got = {}
                for i in sorted({i for i, _ in miss}):  # isolate the failing queries
                    part = [(i2, j) for i2, j in miss if i2 == i]
                    try:
                        got.update(self._call(part, query_ids, queries, passage_ids, passages))
                    except JudgeError:
                        skipped[i] = True
            bad = {i for (i, _), s in got.items() if not math.isfinite(s)}
            if bad and self.on_failure == "error":
                raise JudgeError(f"judge {self.identity!r} returned NaN/inf for query id(s) "
                                 f"{sorted({query_ids[i] for i in bad})}")
            skipped[list(bad)] = True
            rows = []
            for (i, j), s in got.items():
                if not skipped[i]:
                    out[i, j] = s
                    rows.append((self.identity, query_ids[i], passage_ids[i][j], s))
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", rows)
            self.db.commit()
        out[skipped] = math.nan
        self.skipped_queries += int(skipped.sum())
        return out, skipped

    def _call(self, pairs, query_ids, queries, passage_ids, passages) -> dict[tuple[int, int], float]:
        """Send ``pairs`` (row, col) as a (len(pairs), 1) batch; any exception/timeout/shape -> JudgeError."""
        args = ([query_ids[i] for i, _ in pairs], [queries[i] for i, _ in pairs],
                [[passage_ids[i][j]] for i, j in pairs], [[passages[i][j]] for i, j in pairs])
        self.judge_calls += 1
        try:
            if self.timeout is None:
                res = self.judge.score(*args)
            else:
                res = CallableJudge(self.judge.score, self.identity, timeout=self.timeout).score(*args)
            res = torch.as_tensor(res, dtype=torch.float32)
        except JudgeError:
            raise
        except Exception as exc:
            raise JudgeError(f"judge {self.identity!r} raised {type(exc).__name__}: {exc}") from exc
        if tuple(res.shape) != (len(pairs), 1):
            raise JudgeError(f"judge {self.identity!r} returned shape {tuple(res.shape)}, expected ({len(pairs)}, 1)")
        return {p: float(s) for p, s in zip(pairs, res[:, 0].tolist())}


# -------------------------------------------------------------------------------- policy, reward
def pick(scores: torch.Tensor, num_picks: int, *, policy: PickPolicy = "top", temperature: float = 1.0,
         generator: torch.Generator | None = None) -> torch.LongTensor:
    """(B, L) positions into the candidate list chosen by the LSR.

    "top": the L best scores, best first. "sample": L draws without replacement from the
    Plackett-Luce model with logits scores / temperature (Gumbel top-k: the L largest of
    scores / T + Gumbel noise), so a low temperature approaches "top" and a high one uniform.
    """
    b, k = scores.shape
    if not 0 < num_picks <= k:
        raise ValueError(f"pick: num_picks={num_picks} must be in [1, {k}] (candidates per query)")
    if not torch.isfinite(scores).all():
        raise ValueError("pick: scores contain NaN/inf (drop skipped queries first)")
    if policy == "top":
        return scores.topk(num_picks, dim=1).indices
    if policy != "sample":
        raise ValueError(f"pick: policy must be 'top' or 'sample', got {policy!r}")
    if temperature <= 0:
        raise ValueError(f"pick: temperature must be > 0, got {temperature}")
    u = torch.rand(scores.shape, generator=generator, device=scores.device if generator is None else generator.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (scores / temperature + gumbel.to(scores.device)).topk(num_picks, dim=1).indices


def to_reward(scores: torch.Tensor, mapping: RewardMapping = "identity") -> torch.Tensor:
    """Non-negative rewards from judge scores (the CA-PG estimators require r >= 0).

    "identity": the score itself (probabilities, grades); a negative score is an error, since a
    raw logit or a cosine would otherwise be silently mis-credited. "clip": max(0, s).
    "sigmoid": sigmoid(s), for judges returning logits. NaN/inf is always an error.
    """
    if not torch.isfinite(scores).all():
        raise ValueError("to_reward: scores contain NaN/inf (a skipped query must be dropped, not rewarded 0)")
    if mapping == "identity":
        if (scores < 0).any():
            raise ValueError(f"to_reward: mapping 'identity' needs scores >= 0, got min {scores.min().item():.4g}; "
                             "use reward_mapping 'clip' or 'sigmoid' for judges with signed scores")
        return scores
    if mapping == "clip":
        return scores.clamp_min(0.0)
    if mapping == "sigmoid":
        return torch.sigmoid(scores)
    raise ValueError(f"to_reward: mapping must be 'identity', 'clip' or 'sigmoid', got {mapping!r}")
