"""The training loop on tiny random models: every LSR kind end to end, the run folder, the LSR cache, the
skip policy, gradient accumulation / multi-process invariance, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rag_capg.cli import main as cli_main
from rag_capg.cli.train import GROUPS, build_trainer
from rag_capg.config_parsing import config_from_dict
from rag_capg.errors import InputError
from rag_capg.judges import JudgeError
from rag_capg.training.rollout import batch_indices, noise_generator

REPO = Path(__file__).resolve().parents[2]
CALLS: list[int] = []  # pairs judged by counting_judge, one entry per call


def counting_judge(query_ids, queries, passage_ids, passages):
    """A callable LSR: word overlap between query and passage; records how many pairs it was asked."""
    CALLS.append(sum(len(row) for row in passage_ids))
    return [[float(len(set(q.lower().split()) & set(p.lower().split()))) for p in row]
            for q, row in zip(queries, passages)]


def failing_judge(query_ids, queries, passage_ids, passages):
    if "q3" in query_ids:
        raise RuntimeError("judge backend down for q3")
    return [[1.0] * len(row) for row in passage_ids]


def slow_judge(query_ids, queries, passage_ids, passages):
    time.sleep(0.4)
    return counting_judge(query_ids, queries, passage_ids, passages)


def config(tmp_path, model, data, **kw) -> dict:
    """The flat options of a tiny run, as a recipe would hold them."""
    base = dict(model=str(model), dataset=str(data), candidates=5, batch_size=4, max_steps=3,
                learning_rate=1e-3, output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                log_every=1, report_to="none", progress=False, eval_split="test", warmup_ratio=0.0)
    return {**base, **kw}


def train(options: dict) -> dict:
    """What `rag-capg train` does with these options."""
    return build_trainer(*config_from_dict(GROUPS, options)).train()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------- units
def test_batches_are_seeded_permutations_per_epoch():
    epoch0 = [i for s in range(3) for i in batch_indices(12, 4, s, seed=1)]
    assert sorted(epoch0) == list(range(12))
    assert batch_indices(12, 4, 3, seed=1) != batch_indices(12, 4, 0, seed=1)  # reshuffled next epoch
    assert batch_indices(12, 4, 5, seed=1) == batch_indices(12, 4, 5, seed=1)
    a = torch.rand(3, generator=noise_generator(0, 2, 7, "cpu"))
    assert torch.equal(a, torch.rand(3, generator=noise_generator(0, 2, 7, "cpu")))
    assert not torch.equal(a, torch.rand(3, generator=noise_generator(0, 2, 8, "cpu")))


# ------------------------------------------------------------------------------------------- every LSR
@pytest.mark.parametrize("lsr", ["label_oracle", "cross_encoder", "llm_judge", "bi_encoder", "callable"])
def test_each_lsr_trains_and_writes_the_run_folder(lsr, tmp_path, tiny_bi_encoder_path, tiny_beir_dir,
                                                   tiny_cross_encoder_path, tiny_causal_lm_path):
    extra = {"label_oracle": {}, "cross_encoder": {"lsr_model": str(tiny_cross_encoder_path)},
             "llm_judge": {"lsr_model": str(tiny_causal_lm_path)},
             "bi_encoder": {"lsr_model": str(tiny_bi_encoder_path), "reward_mapping": "clip"},
             "callable": {"lsr_callable": "tests.training.test_trainer:counting_judge"}}[lsr]
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, lsr=lsr, num_picks=2, save_every=3, **extra)
    summary = train(cfg)
    run = Path(cfg["output_dir"])
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "eval.jsonl", "run_summary.json", "curves.png",
                 "final/modules.json", "checkpoints/step-3/trainer_state.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and 0 <= r["lsr_hit_rate"] <= 1 for r in rows)
    assert summary["steps"] == 3 and summary["eval_before"]["step"] == 0 and summary["eval_after"]["step"] == 3
    # query tower trained, document tower (and so the index) bit-identical to the base model
    from sentence_transformers import SentenceTransformer

    base, tuned = SentenceTransformer(str(tiny_bi_encoder_path)), SentenceTransformer(str(run / "final"))
    texts = ["bees make honey", "tides follow the moon"]
    assert torch.equal(base.encode_document(texts, convert_to_tensor=True),
                       tuned.encode_document(texts, convert_to_tensor=True))
    assert not torch.allclose(base.encode_query(texts, convert_to_tensor=True),
                              tuned.encode_query(texts, convert_to_tensor=True))


def test_training_improves_the_ranking_it_is_rewarded_for(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # Label oracle on the training queries, evaluated on the same queries: CA-PG must raise nDCG@10.
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, eval_split="train", max_steps=40,
                 learning_rate=3e-3, group_size=4, baseline="group_min_shift", tau=0.05)
    summary = train(cfg)
    assert summary["eval_after"]["ndcg@10"] > summary["eval_before"]["ndcg@10"] + 0.05
    # the end's row carries the paired test against the starting model on the same queries
    assert set(summary["eval_after"]["p_value"]) == {"ndcg@10", "recall@5"}
    assert 0 < summary["eval_after"]["p_value"]["ndcg@10"] < 0.5


@pytest.mark.parametrize("extra", [{"mode": "both_towers", "reindex_every": 2, "estimator": "capg"},
                                   {"softmax": "top_m", "top_m": 12, "tail_samples": 8, "estimator": "top1"},
                                   {"softmax": "top_m", "top_m": 12, "tail_samples": 8, "estimator": "capg",
                                    "top_m_index": "IVF2,Flat", "top_m_search_params": "nprobe=2"},
                                   {"estimator": "vpg_swr", "lsr_policy": "sample", "num_picks": 2},
                                   {"estimator": "capg_exact", "exact_top_m": None}])
def test_modes_and_estimators_run(extra, tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, max_steps=4, eval_split="", **extra)
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if extra.get("mode") == "both_towers":  # re-indexed every 2 steps: staleness cycles 1, 2, 1, 2
        assert [r["index_staleness"] for r in rows] == [1, 2, 1, 2]
        assert rows[0]["index_drift"] == pytest.approx(0.0, abs=1e-4)  # fresh index at step 1


# ------------------------------------------------------------------------------------------- LSR cache
def test_lsr_cache_makes_no_judge_call_in_epoch_two(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # K = the whole 30-passage corpus, so epoch 1 (3 steps x 4 queries) judges every pair of every query.
    CALLS.clear()
    cfg = config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, candidates=30, epochs=2, max_steps=None,
                 lsr="callable", lsr_callable="tests.training.test_trainer:counting_judge", eval_split="")
    summary = train(cfg)
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lsr_misses"] for r in rows] == [120, 120, 120, 0, 0, 0]
    assert sum(CALLS) == 12 * 30 and summary["lsr_cache"]["hits"] == 12 * 30


def test_failing_judge_is_an_error_or_a_counted_skip(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    kw = dict(lsr="callable", lsr_callable="tests.training.test_trainer:failing_judge", eval_split="", max_steps=3)
    with pytest.raises(JudgeError, match="q3"):
        train(config(tmp_path / "a", tiny_bi_encoder_path, tiny_beir_dir, **kw))
    cfg = config(tmp_path / "b", tiny_bi_encoder_path, tiny_beir_dir, lsr_on_error="skip_query", **kw)
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_queries"] for r in rows) == 1  # q3 is seen once in an epoch of 3 steps


def test_bad_input_is_a_clear_error(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, capsys):
    with pytest.raises(InputError) as err:
        train(config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, candidates=31))
    assert err.value.field == "candidates" and "30" in str(err.value)
    assert cli_main(["train", f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "candidates=31",
                     f"output_dir={tmp_path / 'x'}", f"cache_dir={tmp_path / 'c'}", "report_to=none"]) == 2
    assert "candidates" in capsys.readouterr().err
    with pytest.raises(InputError) as err:
        train(config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, train_split="dev"))
    assert "dev" in str(err.value)


# ------------------------------------------------------------------------------------------- invariances
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    a = config(tmp_path / "a", tiny_bi_encoder_path, tiny_beir_dir, eval_split="", group_size=2)
    b = config(tmp_path / "b", tiny_bi_encoder_path, tiny_beir_dir, eval_split="", group_size=2,
               gradient_accumulation_steps=2)
    train(a), train(b)
    assert max_diff(weights(Path(a["output_dir"]) / "final"), weights(Path(b["output_dir"]) / "final")) < 1e-5


def test_both_towers_in_gradient_chunks_trains_like_one_pass(tmp_path, tiny_bi_encoder_path, tiny_beir_dir,
                                                              monkeypatch):
    # grad_chunk_size re-encodes the touched passages a few at a time under activation checkpointing: the
    # same gradients up to round-off (tests/retrieval/test_retriever.py checks the pieces), so the same model.
    import rag_capg.training.trainer as trainer_module

    seen = []
    embed = trainer_module.embed_with_grad
    monkeypatch.setattr(trainer_module, "embed_with_grad",
                        lambda model, texts, **kw: seen.append((kw["route"], len(texts), kw.get("chunk_size")))
                        or embed(model, texts, **kw))
    kw = dict(mode="both_towers", reindex_every=2, eval_split="", group_size=2)
    a = config(tmp_path / "a", tiny_bi_encoder_path, tiny_beir_dir, **kw)
    b = config(tmp_path / "b", tiny_bi_encoder_path, tiny_beir_dir, grad_chunk_size=4, **kw)
    train(a)
    assert all(chunk is None for _, _, chunk in seen)
    seen.clear()
    train(b)
    documents = [(n, chunk) for route, n, chunk in seen if route == "document"]
    assert documents and all(chunk == 4 for _, chunk in documents) and max(n for n, _ in documents) > 4
    # Adam divides by sqrt(v) + eps, so for a weight whose gradient is near eps the round-off of the chunked
    # sums moves its update by a sliver of a step: allow 5% of one step (lr 1e-3); a wrong gradient moves many
    # weights by whole steps
    assert max_diff(weights(Path(a["output_dir"]) / "final"), weights(Path(b["output_dir"]) / "final")) < 5e-5


class FP16Accelerator:
    """The real (CPU) accelerator with a grad scaler, as accelerate sets one up for fp16 on a GPU: a scaled
    backward, unscale_gradients, clipping on unscaled gradients and optimizer_step_was_skipped."""

    def __init__(self, real, scaler, optimizer):
        self._real, self.scaler, self._optimizer = real, scaler, optimizer

    def __getattr__(self, name):
        return getattr(self._real, name)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def unscale_gradients(self):
        self.scaler.unscale_(self._optimizer.optimizer)

    def clip_grad_norm_(self, params, max_norm):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @property
    def optimizer_step_was_skipped(self):
        return self._optimizer.step_was_skipped


def test_fp16_steps_log_unscaled_grad_norms_and_skip_the_scheduler_with_the_optimizer(tmp_path, tiny_bi_encoder_path,
                                                                                      tiny_beir_dir):
    # fp16 needs a GPU; its step logic is imitated on CPU with a real torch GradScaler behind accelerate's
    # optimizer wrapper. max_grad_norm=0: the logged norm must be that of the true gradients (not 1024x), and a
    # step with inf gradients must leave the weights AND the learning-rate schedule where they were.
    from accelerate.optimizer import AcceleratedOptimizer

    def make(name):
        cfg = config(tmp_path / name, tiny_bi_encoder_path, tiny_beir_dir, eval_split="", max_grad_norm=0.0,
                     warmup_ratio=0.5, max_steps=4)
        return build_trainer(*config_from_dict(GROUPS, cfg))

    plain, fp16 = make("plain"), make("fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fp16.optimizer = AcceleratedOptimizer(fp16.optimizer.optimizer, device_placement=False, scaler=scaler)
    fp16.accelerator = FP16Accelerator(fp16.accelerator, scaler, fp16.optimizer)
    row_plain, row_fp16 = plain.optimizer_step(), fp16.optimizer_step()
    assert row_fp16["grad_norm"] == pytest.approx(row_plain["grad_norm"], rel=1e-5)
    assert row_fp16["lr"] == row_plain["lr"] > 0
    # an overflowing step: inf gradients
    step = fp16.training_step
    fp16.training_step = lambda idx: (lambda loss, sums: (loss * float("inf"), sums))(*step(idx))
    before = {n: p.detach().clone() for n, p in fp16.model.named_parameters() if p.requires_grad}
    lr_before, epoch_before = fp16.scheduler.get_last_lr()[0], fp16.scheduler.last_epoch
    fp16.optimizer_step()
    assert fp16.accelerator.optimizer_step_was_skipped and scaler.get_scale() == 512.0
    assert all(torch.equal(p, before[n]) for n, p in fp16.model.named_parameters() if p.requires_grad)
    assert fp16.scheduler.last_epoch == epoch_before and fp16.scheduler.get_last_lr()[0] == lr_before
    fp16.training_step = step  # and the next good step moves both again
    fp16.optimizer_step()
    assert fp16.scheduler.last_epoch == epoch_before + 1


def _cli(args: list[str], **env) -> list[str]:
    return [sys.executable, "-m", "rag_capg.cli", "train", *args]


def test_bf16_autocast_trains_with_float32_weights(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # Accelerate fixes the precision once per process, so the run gets its own (one run per process, as
    # users run). Both towers: the encoder runs under bf16 autocast; the policy's normalisers are float32.
    args = [f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "candidates=5", "batch_size=4",
            "max_steps=4", "learning_rate=1e-3", "report_to=none", "progress=false", "eval_split=",
            "mode=both_towers", "reindex_every=2", "mixed_precision=bf16", f"output_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(_cli(args), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["mixed_precision"] == "bf16"
    final = weights(tmp_path / "run" / "final")
    assert all(t.dtype == torch.float32 for t in final.values())
    base = {k.split("/", 1)[1]: v for k, v in weights(tiny_bi_encoder_path).items()}
    assert max(float((v - base[k.split("/", 1)[1]]).abs().max()) for k, v in final.items()) > 0  # it trained


def test_two_processes_train_like_one(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # torchrun is the launcher `accelerate launch` wraps; ACCELERATE_USE_CPU=1 gives MULTI_CPU on gloo.
    args = [f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "candidates=5", "batch_size=4",
            "max_steps=4", "group_size=2", "learning_rate=1e-3", "report_to=none", "progress=false",
            "eval_split=", "warmup_ratio=0"]
    one = config(tmp_path / "one", tiny_bi_encoder_path, tiny_beir_dir, eval_split="", max_steps=4, group_size=2)
    train(one)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
           "-m", "rag_capg.cli", "train", *args, f"output_dir={tmp_path / 'two'}", f"cache_dir={tmp_path / 'c2'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run_summary.json").read_text())["num_processes"] == 2
    assert max_diff(weights(Path(one["output_dir"]) / "final"), weights(tmp_path / "two" / "final")) < 1e-5


def test_two_processes_train_like_one_in_both_towers_with_gradient_chunks(tmp_path, tiny_bi_encoder_path,
                                                                           tiny_beir_dir):
    # both_towers re-encodes the touched passages with gradient: each query's row is refreshed at its own
    # passages only (otherwise its gradient depended on the other queries of its micro-batch, and two
    # processes trained another model), and a checkpointed chunk recomputed in backward must not re-enter
    # DDP's forward (it hung).
    opts = dict(max_steps=3, group_size=2, eval_split="", mode="both_towers", reindex_every=2, grad_chunk_size=4)
    one = config(tmp_path / "one", tiny_bi_encoder_path, tiny_beir_dir, **opts)
    train(one)
    args = [f"{k}={v}" for k, v in one.items() if k not in ("output_dir", "cache_dir")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29612",
           "-m", "rag_capg.cli", "train", *args, f"output_dir={tmp_path / 'two'}", f"cache_dir={tmp_path / 'c2'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(weights(Path(one["output_dir"]) / "final"), weights(tmp_path / "two" / "final")) < 1e-5


def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    common = dict(max_steps=8, save_every=2, eval_split="", lsr="callable",
                  lsr_callable="tests.training.test_trainer:slow_judge", group_size=2)
    ref = config(tmp_path / "ref", tiny_bi_encoder_path, tiny_beir_dir, **common)
    train(ref)
    out, cache = tmp_path / "killed", tmp_path / "kcache"
    args = [f"{k}={v}" for k, v in common.items()] + [
        f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "candidates=5", "batch_size=4",
        "learning_rate=1e-3", "report_to=none", "progress=false", "warmup_ratio=0", "log_every=1",
        f"output_dir={out}", f"cache_dir={cache}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rag_capg.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-4" / "trainer_state.pt").is_file() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final").exists()  # it really died before the end
    summary = train(config(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, **common, resume=True,
                           output_dir=str(out), cache_dir=str(cache)))
    assert summary["resumed_from"] is not None and summary["steps"] == 8
    assert max_diff(weights(Path(ref["output_dir"]) / "final"), weights(out / "final")) == 0.0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # rows past the checkpoint were dropped, not doubled


def test_lora_trains_few_weights_ships_a_plain_folder_and_resumes_exactly(tmp_path, tiny_bi_encoder_path,
                                                                        tiny_beir_dir):
    common = dict(lora_r=4, lora_alpha=8.0, max_steps=4, save_every=2, eval_split="", group_size=2)
    ref = config(tmp_path / "ref", tiny_bi_encoder_path, tiny_beir_dir, **common)
    train(ref)
    final = Path(ref["output_dir"]) / "final"
    from sentence_transformers import SentenceTransformer

    tuned, base = SentenceTransformer(str(final)), SentenceTransformer(str(tiny_bi_encoder_path))
    assert not list(final.rglob("adapter_config.json"))  # merged: loads without peft
    texts = ["bees make honey", "tides follow the moon"]
    assert torch.equal(tuned.encode_document(texts, convert_to_tensor=True),
                       base.encode_document(texts, convert_to_tensor=True))
    assert not torch.allclose(tuned.encode_query(texts, convert_to_tensor=True),
                              base.encode_query(texts, convert_to_tensor=True))
    # a run resumed from the step-2 checkpoint (as after a kill) ends where the uninterrupted run ended
    import shutil

    resumed = Path(tmp_path / "resumed")
    shutil.copytree(Path(ref["output_dir"]) / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    train({**ref, "output_dir": str(resumed), "resume": True})
    assert max_diff(weights(final), weights(resumed / "final")) == 0.0
