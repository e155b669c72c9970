"""GPU smoke test: every GPU path of the trainer in one command, in under five minutes, with nothing downloaded.

Builds on the spot a word-level tokenizer, random MiniLM-shaped models (a 6 x 384 BERT bi-encoder and
cross-encoder, a small Llama judge) and a synthetic BEIR corpus, then trains, in one process under bf16 autocast:

  1. ce_both_towers   cross_encoder judge (bf16 autocast) + both_towers + capg, grad_chunk_size chunks,
                      group_min_shift, re-indexing; then `resume`: the same run killed at its checkpoint
                      and resumed must end where the uninterrupted run ended
  2. llm_capg_exact   llm_judge (bf16 weights, float32 yes/no head) + capg_exact, query_tower
  3. llm_fp32_top1    llm_judge in float32 + top1, top_m softmax over a FAISS index

and reports, per run and per phase (encode: the encoder passes with gradient and the re-indexing; judge:
the LSR calls; loss: logits, sampling and the surrogate; backward; optimizer: clipping and AdamW), the time
and the peak GPU memory, then PASS or FAIL per check (finite losses, all steps, weights moved, rewards in
range, resume exact to 1e-4, float32 weights under bf16). Results also go to OUT/smoke.json.

    python eval/gpu_smoke.py                    # on the GPU, MiniLM-shaped models
    python eval/gpu_smoke.py --device cpu       # tiny models and corpus: what CI runs (tests/eval/test_gpu_smoke.py)

Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # bi-encoder / cross-encoder (BERT), the Llama judge, the corpus and the step shape
    "minilm": dict(layers=6, hidden=384, heads=12, ffn=1536, seq=256, llm_layers=4, llm_hidden=512, llm_heads=8,
                   llm_ffn=1408, passages=3000, topics=150, queries=400, words=(20, 200), batch=32, group=4, k=20,
                   chunk=64, lsr_batch=256, llm_batch=64, steps=6, top_m=256, tail=256),
    "tiny": dict(layers=2, hidden=32, heads=2, ffn=64, seq=64, llm_layers=2, llm_hidden=32, llm_heads=2, llm_ffn=64,
                 passages=60, topics=12, queries=24, words=(4, 30), batch=4, group=2, k=5, chunk=8, lsr_batch=16,
                 llm_batch=8, steps=4, top_m=20, tail=8),
}
PROMPT_WORDS = ("judge whether the passage answers query is relevant to answer yes or no : . ?").split()


# ------------------------------------------------------------------------------------- built on the spot
def build_corpus(root: Path, size: dict, seed: int = 0) -> Path:
    """A BEIR folder: passages on `topics` topics (8 keywords each, plus filler words), queries made of a
    topic's keywords, each relevant to the passages of its topic."""
    rng = random.Random(seed)
    keywords = [[f"t{t}k{i}" for i in range(8)] for t in range(size["topics"])]
    filler = [f"w{i}" for i in range(500)]
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    lo, hi = size["words"]
    for j in range(size["passages"]):
        t = j % size["topics"]
        n = rng.randint(lo, hi)
        words = [rng.choice(keywords[t]) if rng.random() < 0.3 else rng.choice(filler) for _ in range(n)]
        corpus.append({"_id": f"d{j}", "title": f"topic {t}", "text": " ".join(words)})
    for i in range(size["queries"]):
        t = rng.randrange(size["topics"])
        queries.append({"_id": f"q{i}", "text": " ".join(rng.sample(keywords[t], 3))})
        split = "test" if i % 4 == 0 else "train"
        for j in range(t, size["passages"], size["topics"]):
            qrels[split].append((f"q{i}", f"d{j}", 1))
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))
    return root


def build_tokenizer(out: Path, size: dict):
    """A BERT word-piece tokenizer whose vocabulary holds every word of the corpus and the judge's prompt."""
    from transformers import BertTokenizerFast

    words = [f"t{t}k{i}" for t in range(size["topics"]) for i in range(8)] + [f"w{i}" for i in range(500)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "topic", *map(str, range(10)), *PROMPT_WORDS, *words]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(vocab))}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert len(tok) == len(vocab) and tok.convert_tokens_to_ids("yes") == vocab["yes"]
    tok.save_pretrained(out)
    return tok


def build_models(root: Path, size: dict) -> dict[str, Path]:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(root / "tokenizer", size)
    bert = dict(vocab_size=len(tok), hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                num_attention_heads=size["heads"], intermediate_size=size["ffn"], max_position_embeddings=512)
    torch.manual_seed(0)
    paths = {}
    hf = root / "bi_hf"
    BertModel(BertConfig(**bert)).save_pretrained(hf)
    tok.save_pretrained(hf)
    transformer = Transformer(str(hf), max_seq_length=size["seq"])
    st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                             device="cpu")
    st.save(str(root / "bi"))
    paths["bi"] = root / "bi"
    BertForSequenceClassification(BertConfig(num_labels=1, **bert)).save_pretrained(root / "ce")
    tok.save_pretrained(root / "ce")
    paths["ce"] = root / "ce"
    llama = LlamaConfig(vocab_size=len(tok), hidden_size=size["llm_hidden"], intermediate_size=size["llm_ffn"],
                        num_hidden_layers=size["llm_layers"], num_attention_heads=size["llm_heads"],
                        num_key_value_heads=size["llm_heads"], max_position_embeddings=1024,
                        pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(llama).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    paths["llm"] = root / "llm"
    return paths


# ------------------------------------------------------------------------------------- phase timing
class Phases:
    """Exclusive wall time and peak GPU memory per phase. Each timed call synchronises the GPU at its
    boundaries (so the times add up; it costs a little throughput), and a call nested in another phase's
    call is charged to its own phase only."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.stack: list[list] = []  # [phase, start, peak so far]

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def _peak_now(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else 0

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self._sync()
            now = time.perf_counter()
            if self.stack:  # pause the enclosing phase
                parent = self.stack[-1]
                self.time[parent[0]] = self.time.get(parent[0], 0.0) + now - parent[1]
                parent[2] = max(parent[2], self._peak_now())
            if self.cuda:
                self.torch.cuda.reset_peak_memory_stats()
            self.stack.append([phase, now, 0])
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                end = time.perf_counter()
                _, start, peak = self.stack.pop()
                self.time[phase] = self.time.get(phase, 0.0) + end - start
                self.calls[phase] = self.calls.get(phase, 0) + 1
                self.peak[phase] = max(self.peak.get(phase, 0), peak, self._peak_now())
                if self.stack:
                    self.stack[-1][1] = end
                    if self.cuda:
                        self.torch.cuda.reset_peak_memory_stats()

        setattr(owner, name, timed)


def instrument(trainer, phases: Phases) -> None:
    import rag_capg.training.trainer as trainer_module

    phases.wrap(trainer_module, "embed_with_grad", "encode")  # the query pass and both_towers' passages
    phases.wrap(trainer, "encode_index", "encode")  # re-indexing (both_towers)
    phases.wrap(trainer.judge, "score_with_skips", "judge")
    phases.wrap(trainer, "training_step", "loss")  # logits, sampling, surrogate: what is not encode / judge
    phases.wrap(trainer.accelerator, "backward", "backward")
    phases.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    phases.wrap(trainer.optimizer, "step", "optimizer")
    phases.wrap(trainer, "evaluate", "eval")


# ------------------------------------------------------------------------------------- the runs
def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(f).items()})
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else math.inf


def run(name: str, options: dict, *, cuda: bool, instrumented: bool = True) -> dict:
    import torch

    from rag_capg.cli.train import GROUPS, build_trainer
    from rag_capg.config_parsing import config_from_dict

    # the run's own timed phases and memory: the trainer's construction (model loading, the first
    # index) is outside them
    trainer = build_trainer(*config_from_dict(GROUPS, options))
    phases = Phases(cuda)
    if instrumented:
        instrument(trainer, phases)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = trainer.train()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(options["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "summary": summary, "rows": rows, "wall_s": wall, "time": phases.time,
            "folder": str(Path(options["output_dir"]) / "final"),
            "calls": phases.calls, "peak": phases.peak,  # (the phases reset the peak counter: take their max)
            "peak_total": max([*phases.peak.values(), torch.cuda.max_memory_allocated() if cuda else 0])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    ap.add_argument("--size", choices=list(SIZES), default=None, help="default: minilm on cuda, tiny on cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the size's)")
    ap.add_argument("--mixed-precision", choices=["bf16", "no"], default="bf16", help="autocast of the runs")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # before torch is imported
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["ACCELERATE_USE_CPU"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        print("FAIL: --device cuda but torch sees no GPU")
        return 1
    size = dict(SIZES[args.size or ("minilm" if cuda else "tiny")])
    steps = args.steps or size["steps"]
    precision = args.mixed_precision
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = build_corpus(root / "data", size)
    models = build_models(root / "models", size)
    t_built = time.perf_counter() - t_start
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"gpu_smoke: device={device} size={args.size or ('minilm' if cuda else 'tiny')} steps={steps} "
          f"(corpus {size['passages']} passages, B={size['batch']} G={size['group']} K={size['k']}); "
          f"built in {t_built:.1f} s", flush=True)

    base = dict(model=str(models["bi"]), dataset=str(data), train_split="train", eval_split="test",
                candidates=size["k"], batch_size=size["batch"], group_size=size["group"], max_steps=steps,
                learning_rate=1e-4, warmup_ratio=0.0, scheduler="constant", mixed_precision=precision, log_every=1,
                report_to="none",
                progress=False, encode_batch_size=256 if cuda else 32, seed=0)
    out = root / "runs"
    ce = dict(base, lsr="cross_encoder", lsr_model=str(models["ce"]), lsr_batch_size=size["lsr_batch"],
              estimator="capg", num_picks=2, baseline="group_min_shift", mode="both_towers",
              reindex_every=max(2, steps // 2), grad_chunk_size=size["chunk"], eval_every=0)
    checks: list[tuple[str, bool, str]] = []
    results = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, bool(ok), detail))

    # 1. cross-encoder + both towers + bf16 + capg, and its resume
    half = max(1, steps // 2)
    r = run("ce_both_towers", dict(ce, save_every=half, output_dir=str(out / "ce"), cache_dir=str(out / "ce_cache")),
            cuda=cuda)
    results.append(r)
    # the same run as if killed right after its first checkpoint: its folder up to then, then resume=true
    shutil.copytree(out / "ce", out / "ce_resumed", ignore=shutil.ignore_patterns("final", "run_summary.json"))
    for later in (out / "ce_resumed" / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > half:
            shutil.rmtree(later)
    resumed = run("resume", dict(ce, save_every=half, resume=True, output_dir=str(out / "ce_resumed"),
                                 cache_dir=str(out / "ce_cache")), cuda=cuda)
    results.append(resumed)
    diff = max_diff(weights(out / "ce" / "final"), weights(out / "ce_resumed" / "final"))
    resumed["rows"] = [row for row in resumed["rows"] if row["step"] > half]  # the log also holds steps 1..half
    check("resume: continues from its checkpoint", str(resumed["summary"]["resumed_from"]).endswith(f"step-{half}")
          and [row["step"] for row in resumed["rows"]] == list(range(half + 1, steps + 1)),
          f"from {resumed['summary']['resumed_from']}")
    check("resume: ends where the uninterrupted run ended", diff < 1e-4, f"max |weight diff| {diff:.2e}")
    final = weights(out / "ce" / "final")
    check(f"{precision} autocast: float32 weights", all(t.dtype == torch.float32 for t in final.values()))
    check(f"{precision} autocast: recorded", r["summary"]["mixed_precision"] == precision)
    check("ce_both_towers: index re-encoded", any(row.get("index_staleness") == 1 for row in r["rows"][1:]))

    # 2. LLM judge (bf16 on a GPU) + capg_exact; 3. LLM judge in float32 + top1 over a top-M FAISS index
    llm = dict(base, lsr="llm_judge", lsr_model=str(models["llm"]), lsr_batch_size=size["llm_batch"], num_picks=1,
               eval_every=0, eval_split="")
    results.append(run("llm_capg_exact", dict(llm, estimator="capg_exact", lsr_dtype="auto",
                                              output_dir=str(out / "llm_exact"), cache_dir=str(out / "llm_cache")),
                       cuda=cuda))
    results.append(run("llm_fp32_top1", dict(llm, estimator="top1", lsr_dtype="float32", softmax="top_m",
                                             top_m=size["top_m"], tail_samples=size["tail"],
                                             output_dir=str(out / "llm_fp32"), cache_dir=str(out / "llm32_cache")),
                       cuda=cuda))
    from sentence_transformers import SentenceTransformer

    probe = ["t0k1 t0k2 t0k3", "t1k4 w7 w8"]
    initial = SentenceTransformer(str(models["bi"]), device="cpu").encode_query(probe, convert_to_tensor=True)
    for res in results:
        rows, name = res["rows"], res["name"]
        check(f"{name}: every step logged, losses finite", [row["step"] for row in rows][-1] == steps
              and all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in rows))
        check(f"{name}: rewards >= 0", all(row["reward_mean"] >= 0 for row in rows))
        tuned = SentenceTransformer(res["folder"], device="cpu").encode_query(probe, convert_to_tensor=True)
        change = float((tuned - initial).abs().max())
        check(f"{name}: the encoder trained", change > 0, f"max |query embedding change| {change:.2e}")
    total = time.perf_counter() - t_start
    if cuda:
        check("under five minutes", total < 300, f"{total:.0f} s")

    # report
    gib = lambda b: f"{b / 2**30:.2f}" if cuda else "-"  # noqa: E731
    print(f"\n{'run':<18}{'steps':>6}{'wall s':>9}  " + "".join(f"{p + ' s':>12}" for p in
                                                            ("encode", "judge", "loss", "backward", "optimizer",
                                                             "eval")) + f"{'peak GiB':>10}")
    for res in results:
        n_steps = len(res["rows"])
        print(f"{res['name']:<18}{n_steps:>6}{res['wall_s']:>9.2f}  " + "".join(
            f"{res['time'].get(p, 0.0):>12.2f}" for p in ("encode", "judge", "loss", "backward", "optimizer", "eval"))
            + f"{gib(res['peak_total']):>10}")
    if cuda:
        print("\npeak GPU memory per phase (GiB): " + "; ".join(
            f"{res['name']}: " + ", ".join(f"{p} {gib(v)}" for p, v in res["peak"].items()) for res in results))
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
    failed = [c for c in checks if not c[1]]
    print(f"\n{'PASS' if not failed else 'FAIL'}: {len(checks) - len(failed)}/{len(checks)} checks, "
          f"{total:.0f} s in all")
    report = {"device": device, "size": size, "steps": steps, "total_s": total, "build_s": t_built,
              "runs": [{k: res[k] for k in ("name", "wall_s", "time", "calls", "peak", "peak_total")} |
                       {"steps": len(res["rows"])} for res in results],
              "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]}
    (root / "smoke.json").write_text(json.dumps(report, indent=1))
    print(f"report: {root / 'smoke.json'}")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
