"""The training loop: policy-gradient fine-tuning of a bi-encoder against a frozen late-stage ranker.

    data -> document index -> LSR -> for each step:
        logits  = sim(E_q(x), index) / tau            one matmul, query side with grad, full normaliser
        lists   = G Gumbel-top-K draws per query       the ESR as a Plackett-Luce policy (no grad)
        scores  = LSR(x, lists)                        frozen judge, cached on disk by (LSR, query, passage)
        picks   = top-L (or sampled) of the scores     rewards r_l = mapping(score) >= 0
        loss    = surrogate(estimator, logits, lists, picks, rewards)
        backward, all-reduce, clip, AdamW step, scheduler step

Everything random in a step (which queries, the Gumbel noise, the LSR's sampled picks) is a function of
(seed, step, query index) alone, never of the process layout: `accelerate launch --num_processes P` splits
each global batch into P equal shards and averages the gradients, so it trains the same model as one
process on the same global batch. The same property makes resume exact: a checkpoint is the weights, the
optimizer / scheduler state and the step counter.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from rag_capg.data import QuerySet, check_candidate_size, load_corpus, load_queries
from rag_capg.errors import InputError
from rag_capg.estimators import group_baseline_rewards, surrogate_loss
from rag_capg.judges import pick, to_reward
from rag_capg.policy import deterministic_top_k, entropy, sample_plackett_luce
from rag_capg.retriever import TopMIndex, embed_with_grad, encode_corpus, make_query_tower_model, scores
from rag_capg.train_config import TrainConfig
from rag_capg.train_utils import (RunLogger, build_judge, evaluate_retriever, find_last_checkpoint,
                                  load_checkpoint, load_encoder, save_best, save_checkpoint, seed_everything)


def noise_generator(seed: int, step: int, query_index: int, device) -> torch.Generator:
    """A generator private to one (step, query): the query's randomness does not depend on which process
    handles it, nor on how many queries share its micro-batch."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_000_033 + query_index)
    return g


def batch_indices(num_queries: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The global batch of `step`: a seeded permutation per epoch, cut into batches (last partial dropped).
    The data order is therefore a function of the step counter, which is all a checkpoint has to store."""
    per_epoch = num_queries // batch_size
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[position * batch_size:(position + 1) * batch_size].tolist()


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = c = config
        self.out = Path(c.output_dir)
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision,
                                       log_with="tensorboard" if c.report_to == "tensorboard" else None,
                                       project_dir=str(self.out))
        seed_everything(c.seed)
        # 1. data ---------------------------------------------------------------------------------------
        self.corpus = load_corpus(c.dataset, corpus_file=c.corpus_file)
        check_candidate_size(c.candidates, self.corpus, field="candidates")
        self.train_q = load_queries(c.dataset, c.train_split, self.corpus, queries_file=c.queries_file,
                                    qrels_file=c.qrels_file, require_labels=c.lsr == "label_oracle")
        self.train_q = _head(self.train_q, c.max_train_queries)
        self.eval_q = None
        if c.eval_split:
            self.eval_q = _head(load_queries(c.dataset, c.eval_split, self.corpus, queries_file=c.queries_file),
                                c.max_eval_queries)
        shards = self.accelerator.num_processes * c.gradient_accumulation_steps
        if c.batch_size % shards:
            raise InputError(f"the global batch of {c.batch_size} queries must split evenly over "
                             f"{self.accelerator.num_processes} processes x {c.gradient_accumulation_steps} "
                             "accumulation steps", field="batch_size")
        if c.batch_size > len(self.train_q):
            raise InputError(f"{c.batch_size} exceeds the {len(self.train_q)} training queries of split "
                             f"{c.train_split!r}", field="batch_size")
        self.steps_per_epoch = len(self.train_q) // c.batch_size
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        # 2. the early-stage ranker and its document index -------------------------------------------------
        self.normalize = c.similarity == "cosine"
        base = load_encoder(c.model, device=self.accelerator.device)
        self.doc_emb = self.encode_index(base, cache=True)
        self.topm = None
        if c.softmax == "top_m":
            if c.mode != "query_tower" or c.top_m >= len(self.corpus):
                raise InputError("the top-M softmax needs mode=query_tower and top_m < corpus size "
                                 f"({len(self.corpus)})", field="softmax")
            self.topm = TopMIndex(self.doc_emb.cpu(), similarity=c.similarity)
        self.model = make_query_tower_model(base) if c.mode == "query_tower" else base
        self.model.to(self.accelerator.device)
        self.model.train(c.dropout)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_drift = 0.0
        self.index_step = 0  # step at which the index was last encoded (both_towers staleness)
        # 3. the late-stage ranker (frozen, cached) -------------------------------------------------------
        self.judge = build_judge(c, self.train_q, self.accelerator, self.corpus)
        # 4. optimisation ---------------------------------------------------------------------------------
        optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        # Only the optimizer goes through accelerate (it owns the fp16 grad scaler). The scheduler is stepped
        # by hand: a prepared scheduler steps once per process, which would tie the schedule to the layout.
        self.optimizer = self.accelerator.prepare(optimizer)
        self.scheduler = get_scheduler(c.scheduler, optimizer,
                                       num_warmup_steps=math.ceil(c.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.step, self.best = 0, {"metric": None, "step": None}
        self.logger = RunLogger(self.out, self.accelerator, c)

    # ------------------------------------------------------------------------------------------ the index
    def encode_index(self, model, *, cache: bool) -> torch.Tensor:
        emb = encode_corpus(model, self.corpus, cache_dir=Path(self.config.cache_dir) / "embeddings" if cache else None,
                            batch_size=self.config.encode_batch_size, accelerator=self.accelerator,
                            show_progress=self.config.progress and self.accelerator.is_local_main_process,
                            normalize=self.normalize)
        return emb.to(self.accelerator.device, torch.float32)

    # ------------------------------------------------------------------------------------------ one step
    def policy_loss(self, query_idx: list[int], stats: torch.Tensor) -> torch.Tensor:
        """Surrogate loss of one micro-batch of queries; accumulates logging sums into `stats`."""
        c, dev = self.config, self.accelerator.device
        B, G, K, L = len(query_idx), c.group_size, c.candidates, c.num_picks
        with self.accelerator.autocast():
            q = embed_with_grad(self.model, [self.train_q.texts[i] for i in query_idx], route="query")
        # Logits in float32: the normaliser of every estimator is a logsumexp of these (never half precision).
        if c.softmax == "full":  # one matmul against the whole index: exact normaliser
            logits, mask, ids_of = scores(q.float(), self.doc_emb, similarity=c.similarity, tau=c.tau), None, None
        else:  # top-M items + one never-drawn pseudo-item carrying the estimated tail mass (retriever.TopMIndex)
            parts = [self.topm.restricted_logits(q[b:b + 1].float(), c.top_m, c.tail_samples, tau=c.tau,
                                                 generator=noise_generator(c.seed + 2, self.step, i, "cpu"))
                     for b, i in enumerate(query_idx)]
            logits, ids_of, mask = (torch.cat(t) for t in zip(*parts))
        # G Gumbel-top-K lists per query, each query with its own noise stream. `lists` index the logits'
        # columns; `cand` are corpus ids (the same thing unless the softmax is restricted).
        lists = torch.cat([sample_plackett_luce(logits[b].detach().expand(G, -1), K,
                                                mask=None if mask is None else mask[b].expand(G, -1),
                                                generator=noise_generator(c.seed, self.step, i, dev))
                           for b, i in enumerate(query_idx)])  # (B*G, K)
        cand = lists if ids_of is None else ids_of.repeat_interleave(G, dim=0).gather(1, lists)
        if c.mode == "both_towers":
            logits = self.refresh_logits(q, logits, lists)
        # The LSR judges every (query, candidate) pair; the cache answers the pairs it has seen before.
        rep = [i for i in query_idx for _ in range(G)]
        lsr_scores, skipped = self.judge.score_with_skips(
            [self.train_q.ids[i] for i in rep], [self.train_q.texts[i] for i in rep],
            [[self.corpus.ids[j] for j in row] for row in cand.tolist()],
            [[self.corpus.texts[j] for j in row] for row in cand.tolist()])
        keep = ~skipped.view(B, G).any(dim=1)  # lsr_on_error=skip_query: drop the query, count it
        lsr_scores = torch.nan_to_num(lsr_scores.float().cpu(), nan=0.0)  # skipped rows are dropped below
        positions = torch.cat([pick(lsr_scores[b * G:(b + 1) * G], L, policy=c.lsr_policy,
                                    temperature=c.lsr_temperature,
                                    generator=noise_generator(c.seed + 1, self.step, i, "cpu"))
                               for b, i in enumerate(query_idx)])  # (B*G, L) positions in the lists
        try:
            raw = to_reward(lsr_scores.gather(1, positions), c.reward_mapping)  # (B*G, L), >= 0
        except ValueError as err:  # e.g. a signed judge under reward_mapping=identity
            raise InputError(str(err), field="reward_mapping") from None
        rewards = group_baseline_rewards(raw.view(B, G, L)).reshape(B * G, L) \
            if c.baseline == "group_min_shift" else raw
        picks = lists.gather(1, positions.to(dev))
        rows = keep.repeat_interleave(G).to(dev)
        if bool(rows.any()):
            loss = surrogate_loss(c.estimator, logits.repeat_interleave(G, dim=0)[rows], lists[rows], picks[rows],
                                  rewards.to(dev, torch.float32)[rows], exact_nodes=c.exact_nodes,
                                  exact_top_m=c.exact_top_m)
        else:
            loss = logits.sum() * 0.0  # every query skipped: a zero gradient, still all-reduced
        # logging sums (reduced over processes by the caller)
        kept = raw.view(B, G, L)[keep]  # (B', G, L)
        stats += torch.tensor([
            float(kept.sum()), float((kept ** 2).sum()), float(kept.numel()),
            float((kept.flatten(1).std(dim=1, correction=0) == 0).sum()), float(kept.shape[0]),
            *self.candidate_recall(query_idx, cand, G),
            float(entropy(logits.detach()).sum()), float(B), float(loss.detach()) * B, float((~keep).sum()),
            float((kept.flatten(1).amax(dim=1) == 0).sum())],
            dtype=torch.float64)
        return loss

    def refresh_logits(self, q: torch.Tensor, logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
        """both_towers: re-encode, with gradient, every document the loss touches (the candidates, hence the
        picks, and the top-K prefix items of CA-PG's inclusion approximation) and scatter their fresh logits
        into the index logits. The normaliser over the rest of the corpus still uses the (stale) index."""
        c = self.config
        touched = torch.cat([lists.flatten(), deterministic_top_k(logits.detach(), c.candidates).flatten()]).unique()
        with self.accelerator.autocast():
            d = embed_with_grad(self.model, [self.corpus.texts[j] for j in touched.tolist()], route="document")
        fresh = scores(q.float(), d.float(), similarity=c.similarity, tau=c.tau)  # (B, U)
        self.last_drift = float((fresh.detach() - logits.detach()[:, touched]).abs().mean())
        return logits.scatter(1, touched.expand(logits.shape[0], -1), fresh)

    def candidate_recall(self, query_idx: list[int], lists: torch.Tensor, G: int) -> tuple[float, float]:
        """Share of a query's labelled passages present in its candidate list (summed, count)."""
        total, count = 0.0, 0
        for row, ids in enumerate(lists.tolist()):
            rel = self.train_q.qrels.get(self.train_q.ids[query_idx[row // G]]) or {}
            if rel:
                total += len(rel.keys() & {self.corpus.ids[j] for j in ids}) / len(rel)
                count += 1
        return total, float(count)

    def optimizer_step(self) -> dict:
        c, acc = self.config, self.accelerator
        batch = batch_indices(len(self.train_q), c.batch_size, self.step, c.seed)
        per_proc = c.batch_size // acc.num_processes
        local = batch[acc.process_index * per_proc:(acc.process_index + 1) * per_proc]
        micro = per_proc // c.gradient_accumulation_steps
        stats = torch.zeros(12, dtype=torch.float64)
        hits0, misses0 = self.judge.hits, self.judge.misses
        for a in range(c.gradient_accumulation_steps):
            loss = self.policy_loss(local[a * micro:(a + 1) * micro], stats)
            acc.backward(loss / c.gradient_accumulation_steps)
        # Average gradients over processes: each process holds the mean over its equal shard, so the mean
        # of the shards' gradients is the gradient of the global-batch mean (what one process computes).
        if acc.num_processes > 1:
            for p in self.params:
                p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
        if c.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.params, c.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        lookups = torch.tensor([self.judge.hits - hits0, self.judge.misses - misses0], dtype=torch.float64)
        stats = acc.reduce(torch.cat([stats, lookups]).to(acc.device), reduction="sum").cpu()
        s = stats.tolist()
        n = max(s[2], 1.0)
        mean = s[0] / n
        staleness = {"index_staleness": self.step + 1 - self.index_step, "index_drift": self.last_drift} \
            if c.mode == "both_towers" else {"index_staleness": 0}
        return {"loss": s[9] / max(s[8], 1), "reward_mean": mean, "reward_std": math.sqrt(max(s[1] / n - mean ** 2, 0)),
                # a group of one reward (G * L = 1) has no variance to speak of: not logged then
                "zero_var_frac": s[3] / max(s[4], 1) if c.group_size * c.num_picks > 1 else None,
                "candidate_recall": s[5] / s[6] if s[6] else None,
                "entropy": s[7] / max(s[8], 1), "skipped_queries": int(s[10]), "grad_norm": grad_norm,
                "zero_reward_frac": s[11] / max(s[4], 1), "lr": self.scheduler.get_last_lr()[0],
                "lsr_hit_rate": s[12] / max(s[12] + s[13], 1), "lsr_misses": int(s[13]), **staleness}

    # ------------------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict | None:
        if self.eval_q is None:
            return None
        c = self.config
        if c.mode == "both_towers" and self.index_step != self.step:  # evaluate against a fresh index
            self.doc_emb, self.index_step = self.encode_index(self.model, cache=False), self.step
        row = evaluate_retriever(self.model, self.doc_emb, self.eval_q, self.corpus, k=c.candidates,
                                 similarity=c.similarity, normalize=self.normalize,
                                 batch_size=c.encode_batch_size)
        row = {"step": self.step, "split": self.eval_q.split, **row}
        self.logger.log_eval(row)
        metric = row["ndcg@10"] if c.metric_for_best == "ndcg@10" else row[f"recall@{c.candidates}"]
        if self.step > 0 and (self.best["metric"] is None or metric > self.best["metric"]):
            self.best = {"metric": metric, "step": self.step, "name": c.metric_for_best}
            save_best(self.out, self.model, self.best, self.accelerator)
        return row

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        c, acc = self.config, self.accelerator
        t0 = time.time()
        resumed_from = None
        if c.resume and (ckpt := find_last_checkpoint(self.out)) is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
            self.step, self.best, self.index_step = state["step"], state["best"], state["index_step"]
            if state.get("index") is not None:
                self.doc_emb = state["index"].to(acc.device)
            self.logger.truncate(self.step)
            resumed_from = str(ckpt)
        elif (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir()):
            raise InputError(f"{self.out} already holds checkpoints: pass resume=true to continue that run, "
                             "or choose another output_dir", field="output_dir")
        self.logger.start(resumed_from)
        before = self.evaluate() if (c.eval_before and self.step == 0) else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (c.progress and acc.is_local_main_process))
        while self.step < self.total_steps:
            if c.mode == "both_towers" and self.step - self.index_step >= c.reindex_every:
                self.doc_emb, self.index_step = self.encode_index(self.model, cache=False), self.step
            row = self.optimizer_step()
            self.step += 1
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                self.logger.log_train({"step": self.step, "epoch": self.step / self.steps_per_epoch, **row})
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3f}")
            if c.eval_every and self.step % c.eval_every == 0 and self.step != self.total_steps:
                self.evaluate()
            if c.save_every and self.step % c.save_every == 0:
                save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler, acc,
                                {"step": self.step, "best": self.best, "index_step": self.index_step,
                                 "index": self.doc_emb.cpu() if c.mode == "both_towers" else None},
                                limit=c.save_total_limit)
        bar.close()
        after = self.evaluate()
        wall = time.time() - t0
        summary = {"base_model": c.model, "dataset": c.dataset, "lsr": getattr(self.judge, "identity", c.lsr),
                   "reward_mapping": c.reward_mapping, "estimator": c.estimator, "K": c.candidates,
                   "L": c.num_picks, "G": c.group_size, "mode": c.mode, "steps": self.step,
                   "train_queries": len(self.train_q), "corpus_size": len(self.corpus),
                   "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
                   "wall_time_s": round(wall, 1), "resumed_from": resumed_from,
                   "eval_before": before, "eval_after": after, "best": self.best,
                   "lsr_cache": {"hits": self.judge.hits, "misses": self.judge.misses}}
        self.logger.finish(self.model, summary)
        return summary


def _head(qs: QuerySet, n: int | None) -> QuerySet:
    if n is None or n >= len(qs):
        return qs
    return QuerySet(ids=qs.ids[:n], texts=qs.texts[:n], qrels={q: qs.qrels.get(q, {}) for q in qs.ids[:n]},
                    split=qs.split)


def train(config: TrainConfig) -> dict:
    return Trainer(config).train()
