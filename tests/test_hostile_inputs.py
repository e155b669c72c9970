"""The hostile-user catalogue (issue 16): bad input and faults that once gave wrong numbers, mixed run folders
or tracebacks. One test (or a few) per numbered hole, named test_NN_...; each fails on the code before the fix.

The promises they hold the code to (README, "Run folders and caches: what rag-capg promises"): a run folder
belongs to one run; no number is computed on silently altered input; every failure is one line naming the
file (line, field) and the fix, before any expensive work; a corrupt cache is rebuilt or named; a judge has a
timeout; outputs are readable like any file the user writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rag_capg import cli
from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.retrieval.data import load_corpus, load_queries
from tests.training.test_trainer import REPO, config, train

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TEST_QUERIES = [f"q{i}" for i in range(12, 20)]  # the tiny BEIR fixture's test split


# ------------------------------------------------------------------------------------- judges (callables)
def overlap(query_ids, queries, passage_ids, passages):
    return [[float(len(set(q.split()) & set(p.split()))) for p in row] for q, row in zip(queries, passages)]


def always_fails(query_ids, queries, passage_ids, passages):
    raise RuntimeError("judge backend down")


def hangs_on_q3(query_ids, queries, passage_ids, passages):
    if "q3" in query_ids or "q15" in query_ids:  # q3: a training query; q15: a test query
        time.sleep(3600)
    return overlap(query_ids, queries, passage_ids, passages)


def hangs_forever(query_ids, queries, passage_ids, passages):
    time.sleep(3600)


def sleepy(query_ids, queries, passage_ids, passages):
    time.sleep(float(os.environ.get("SLEEPY_JUDGE_SECONDS", "0")))
    return overlap(query_ids, queries, passage_ids, passages)


def opts(root: Path, model, data, **kw) -> dict:
    """A two-step run without evaluation: the smallest run that exercises the folder."""
    return config(root, model, data, **{"max_steps": 2, "eval_split": "", **kw})


def cli_args(options: dict) -> list[str]:
    return [f"{k}={v}" for k, v in options.items()]


def write_run(root: Path, lists: dict[str, list[str]]) -> Path:
    """A TREC run file: ``lists[q]`` ranked first to last."""
    path = root / "lists.trec"
    path.write_text("".join(f"{q} Q0 {d} {r} {100 - r} x\n" for q, docs in lists.items()
                            for r, d in enumerate(docs, 1)))
    return path


@pytest.fixture(scope="module")
def beir(tiny_beir_dir):
    corpus = load_corpus(str(tiny_beir_dir))
    return corpus, load_queries(str(tiny_beir_dir), "test", corpus)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_bi_encoder_path, tiny_beir_dir) -> dict:
    """A finished seed-7 run with a checkpoint at its last step."""
    options = opts(tmp_path_factory.mktemp("ckpt"), tiny_bi_encoder_path, tiny_beir_dir, save_every=2, seed=7)
    train(options)
    return options


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bi_encoder_path, tiny_beir_dir) -> dict:
    """A finished run without checkpoints (save_every=0) that chose its final/ on dev queries (best.json),
    written under umask 022."""
    options = opts(tmp_path_factory.mktemp("finished"), tiny_bi_encoder_path, tiny_beir_dir, eval_split="test",
                   dev_fraction=0.5, dev_max_queries=None)
    old = os.umask(0o022)
    try:
        train(options)
    finally:
        os.umask(old)
    return options


def copy_run(options: dict, root: Path, **kw) -> dict:
    shutil.copytree(options["output_dir"], root / "run")
    return {**options, "output_dir": str(root / "run"), **kw}


# ------------------------------------------------------------------------------------------- 1 + 13
def test_01_two_stage_keeps_each_querys_own_list(tmp_path, tiny_beir_dir, beir):
    # Every test query's relevant passages sit at the END of its list (first stage: nDCG@10 ~ 0), q12's list is
    # two long and q13 is absent. The label oracle reranks each list by grade: nDCG@10 = 1 for every query whose
    # list holds all its relevant passages (7 of 8), and 0 for q13, which has no list. The old code cut every
    # query of the batch to the shortest list (here 0 passages) and scored them all 0.
    corpus, queries = beir
    lists = {}
    for q in TEST_QUERIES:
        rel = sorted(queries.qrels[q])
        filler = [d for d in corpus.ids if d not in rel][:18]
        lists[q] = ([filler[0]] + rel) if q == "q12" else (filler + rel)
    del lists["q13"]
    run = write_run(tmp_path, lists)
    out = tmp_path / "out"
    assert cli.main(["eval", f"models=[{run}]", f"dataset={tiny_beir_dir}", "candidates=20", "lsr=label_oracle",
                     "num_picks=5", f"output_dir={out}", f"cache_dir={tmp_path / 'c'}"]) == 0
    entry = json.loads((out / "results.json").read_text())["models"][0]
    per_query = entry["two_stage"]["per_query"]["ndcg@10"]
    assert per_query == pytest.approx({q: 0.0 if q == "q13" else 1.0 for q in TEST_QUERIES})
    assert entry["two_stage"]["mean"]["ndcg@10"] == pytest.approx(7 / 8)
    assert entry["queries_without_ranking"] == ["q13"]  # said, not silent
    # first stage, by hand: q12's one relevant passage (grade 2) at rank 2 -> (2 / log2 3) / 2; the rest 0
    assert entry["first_stage"]["per_query"]["ndcg@10"]["q12"] == pytest.approx(1 / math.log2(3))


def test_01_a_failing_judge_stops_eval_in_one_line(tmp_path, tiny_beir_dir, beir, capsys):
    # With a query absent from the run the old code never called the judge: lsr_on_error=error never fired.
    corpus, queries = beir
    run = write_run(tmp_path, {q: sorted(queries.qrels[q]) for q in TEST_QUERIES[1:]})
    code = cli.main(["eval", f"models=[{run}]", f"dataset={tiny_beir_dir}", "candidates=20", "lsr=callable",
                     "lsr_callable=tests.test_hostile_inputs:always_fails", "num_picks=5",
                     f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it, the progress bar)
    assert code == 1 and last.startswith("rag-capg eval: error: judge") and "judge backend down" in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_13_a_run_of_other_query_ids_is_refused(tmp_path, tiny_beir_dir, capsys):
    run = tmp_path / "other.trec"
    run.write_text("PLAIN-1 Q0 d0_0 1 1.0 x\n")
    code = cli.main(["eval", f"models=[{run}]", f"dataset={tiny_beir_dir}", "candidates=20",
                     f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"])
    err = capsys.readouterr().err
    assert code == 2 and "other.trec" in err and "none of its 1 query ids" in err and "'test'" in err


def test_13_eval_checks_every_model_before_evaluating_any(tmp_path, tiny_beir_dir, tiny_bi_encoder_path, capsys,
                                                         monkeypatch):
    import rag_capg.retrieval.retriever as R

    monkeypatch.setattr(R, "_encode", lambda *a, **k: pytest.fail("a model was evaluated before the typo was found"))
    code = cli.main(["eval", f"models=[{tiny_bi_encoder_path},{tmp_path / 'runs' / 'cpag'}]",
                     f"dataset={tiny_beir_dir}", "candidates=20", f"output_dir={tmp_path / 'out'}",
                     f"cache_dir={tmp_path / 'c'}"])
    assert code == 2 and "cpag" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


# ------------------------------------------------------------------------------------------- 2
def test_02_a_run_folder_is_locked_and_a_killed_run_frees_it(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    options = opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, lsr="callable",
                   lsr_callable="tests.test_hostile_inputs:sleepy")
    first = subprocess.Popen([sys.executable, "-m", "rag_capg.cli", "train", *cli_args(options)], cwd=REPO,
                             env={**ENV, "SLEEPY_JUDGE_SECONDS": "600"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 150
        while not (Path(options["output_dir"]) / "config.yaml").is_file() and time.time() < deadline:
            assert first.poll() is None, "the first run died"
            time.sleep(0.1)
        with pytest.raises(InputError, match=rf"in use by another run \(pid {first.pid} "):
            train(options)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # SIGKILL released its lock; it died before its first checkpoint, so the same run restarts at step 0
    summary = train({**options, "resume": True})
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    assert not (Path(options["output_dir"]) / ".lock").exists()  # released at the end


# ------------------------------------------------------------------------------------------- 3
def test_03_resume_refuses_other_run_defining_options(tmp_path, checkpointed_run):
    options = copy_run(checkpointed_run, tmp_path)
    saved = (Path(options["output_dir"]) / "config.yaml").read_text()
    with pytest.raises(InputError) as err:
        train({**options, "resume": True, "seed": 99, "estimator": "capg", "batch_size": 2, "candidates": 3})
    for change in ("seed: 7 -> 99", "estimator: 'top1' -> 'capg'", "batch_size: 4 -> 2", "candidates: 5 -> 3"):
        assert change in str(err.value)
    assert (Path(options["output_dir"]) / "config.yaml").read_text() == saved  # nothing rewritten


def test_03_resume_with_the_same_run_and_other_logging_options_continues(tmp_path, checkpointed_run):
    options = copy_run(checkpointed_run, tmp_path, resume=True, log_every=2, save_every=0, progress=True)
    run = Path(options["output_dir"])
    # 13: what a kill during a checkpoint or a swap leaves behind is swept when the folder is next opened
    (run / "checkpoints" / ".step-4.k2j3x").mkdir()
    (run / ".final.old").mkdir()
    summary = train(options)
    assert summary["resumed_from"].endswith("step-2") and summary["steps"] == 2
    assert not (run / "checkpoints" / ".step-4.k2j3x").exists() and not (run / ".final.old").exists()


def test_11_a_damaged_checkpoint_is_named(tmp_path, checkpointed_run):
    options = copy_run(checkpointed_run, tmp_path, resume=True)
    state = Path(options["output_dir"]) / "checkpoints" / "step-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(InputError, match="damaged checkpoint") as err:
        train(options)
    assert str(state) in str(err.value) and "step-2" in str(err.value)


# ------------------------------------------------------------------------------------------- 4
def test_04_a_used_folder_is_refused_not_mixed(tmp_path, finished_run):
    options = copy_run(finished_run, tmp_path)
    run = Path(options["output_dir"])
    best = (run / "best.json").read_text()
    with pytest.raises(InputError, match="already holds a run") as err:
        train(options)
    assert "resume=true" in str(err.value) and "another output_dir" in str(err.value)
    with pytest.raises(InputError, match="finished run without checkpoints"):
        train({**options, "resume": True})
    assert (run / "best.json").read_text() == best and (run / "final").is_dir()


# ------------------------------------------------------------------------------------------- 5
def test_05_a_misspelt_train_split_is_refused_for_model_judges(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    with pytest.raises(InputError, match=r"'trian' does not exist; available: test, train"):
        train(opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, train_split="trian", lsr="callable",
                   lsr_callable="tests.test_hostile_inputs:overlap"))


# ------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan", "wrong_dimension"])
def test_06_a_damaged_embedding_cache_is_moved_aside_and_rebuilt(damage, tmp_path, tiny_bi_encoder_path,
                                                                  tiny_beir_dir, capsys):
    from rag_capg.retrieval.retriever import corpus_cache_path, encode_corpus, load_encoder

    model, corpus = load_encoder(str(tiny_bi_encoder_path)), load_corpus(str(tiny_beir_dir))
    fresh = encode_corpus(model, corpus, cache_dir=tmp_path, normalize=True, show_progress=False)
    path = corpus_cache_path(model, corpus, tmp_path, normalize=True)
    blob = torch.load(path, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        blob["embeddings"] = torch.full_like(blob["embeddings"], math.nan) if damage == "nan" else \
            blob["embeddings"][:, :7]
        torch.save(blob, path)
    again = encode_corpus(model, corpus, cache_dir=tmp_path, normalize=True, show_progress=False)
    torch.testing.assert_close(again, fresh)
    assert (path.parent / f"{path.name}.corrupt").is_file()
    assert str(path) in capsys.readouterr().err
    torch.testing.assert_close(torch.load(path, weights_only=True)["embeddings"], fresh)  # rebuilt


def _score_cache(path: Path):
    from rag_capg.judges.base import CallableJudge
    from rag_capg.judges.cache import ScoreCache

    return ScoreCache(CallableJudge(overlap, "overlap"), path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "null_and_text_scores"])
def test_06_a_damaged_score_cache_is_moved_aside_or_its_bad_rows_rejudged(damage, tmp_path, capsys):
    path = tmp_path / "lsr" / "scores.sqlite"
    cache = _score_cache(path)
    pids = [[f"p{i}" for i in range(400)]]
    for q in range(8):  # enough rows for several pages, so that a cut file loses some
        cache.score([f"q{q}"], ["a b"], pids, [["a"] * 400])
    cache.db.close()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE scores SET score = NULL WHERE qid = 'q0' AND pid = 'p0'")
            db.execute("UPDATE scores SET score = 'high' WHERE qid = 'q0' AND pid = 'p1'")
    cache = _score_cache(path)
    # Cached, every pair scored 1 (its passage was "a"); judged now, these passages score 1, 2 and 0.
    scores = cache.score(["q0"], ["a b"], [["p0", "p1", "p2"]], [["b", "a b", "zzz"]])
    if damage == "null_and_text_scores":  # the two bad rows are misses, judged again; the sound one a hit
        assert scores.tolist() == [[1.0, 2.0, 1.0]] and cache.stats()["misses"] == 2
    else:  # the whole file moved aside, named, and every pair judged again
        assert scores.tolist() == [[1.0, 2.0, 0.0]] and cache.stats()["hits"] == 0
        assert list(path.parent.glob("scores.sqlite.corrupt-*")) and str(path) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 7
def test_07_a_hanging_judge_is_timed_out_and_skipped_in_training(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # One epoch of 3 steps x 4 queries: q3 comes once; its judge call never returns.
    options = opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, max_steps=3, lsr="callable",
                   lsr_callable="tests.test_hostile_inputs:hangs_on_q3", lsr_on_error="skip_query", lsr_timeout=0.5)
    start = time.time()
    summary = train(options)
    assert time.time() - start < 120
    rows = [json.loads(line) for line in (Path(options["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_queries"] for r in rows) == 1 == summary["skipped_queries"]
    assert summary["trained_steps_with_signal"] == 3


def test_07_a_hanging_judge_is_timed_out_in_eval_and_the_query_counted(tmp_path, tiny_beir_dir, beir):
    corpus, queries = beir
    run = write_run(tmp_path, {q: sorted(queries.qrels[q]) for q in TEST_QUERIES})
    assert cli.main(["eval", f"models=[{run}]", f"dataset={tiny_beir_dir}", "candidates=20", "lsr=callable",
                     "lsr_callable=tests.test_hostile_inputs:hangs_on_q3", "lsr_on_error=skip_query",
                     "lsr_timeout=0.5", "num_picks=5", f"output_dir={tmp_path / 'out'}",
                     f"cache_dir={tmp_path / 'c'}"]) == 0
    two_stage = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]["two_stage"]
    assert two_stage["skipped_queries"] == ["q15"] and set(two_stage["per_query"]["ndcg@10"]) == \
        set(TEST_QUERIES) - {"q15"}
    assert "judge failed on 1 queries" in (tmp_path / "out" / "results.md").read_text()


def test_07_a_hanging_judge_under_error_stops_eval_in_one_line(tmp_path, tiny_beir_dir, beir, capsys):
    corpus, queries = beir
    run = write_run(tmp_path, {q: sorted(queries.qrels[q]) for q in TEST_QUERIES})
    start = time.time()
    assert cli.main(["eval", f"models=[{run}]", f"dataset={tiny_beir_dir}", "candidates=20", "lsr=callable",
                     "lsr_callable=tests.test_hostile_inputs:hangs_on_q3", "lsr_timeout=0.5", "num_picks=5",
                     f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'c'}"]) == 1
    assert time.time() - start < 60
    assert "timed out after 0.5 s" in capsys.readouterr().err.strip().splitlines()[-1]


def test_07_11_a_hanging_judge_under_error_ends_the_cli_in_one_line(tmp_path, tiny_bi_encoder_path, tiny_beir_dir):
    # The old timeout ran the judge in a ThreadPoolExecutor, whose worker is joined at exit: the process hung.
    options = opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, max_steps=1, lsr="callable",
                   lsr_callable="tests.test_hostile_inputs:hangs_forever", lsr_timeout=1)
    proc = subprocess.run([sys.executable, "-m", "rag_capg.cli", "train", *cli_args(options)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "timed out after 1.0 s" in last and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------- 8
def test_08_a_run_in_which_every_query_was_skipped_says_so(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, capsys):
    options = opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, lsr="callable",
                   lsr_callable="tests.test_hostile_inputs:always_fails", lsr_on_error="skip_query")
    summary = train(options)
    saved = json.loads((Path(options["output_dir"]) / "run_summary.json").read_text())
    assert saved["trained_steps_with_signal"] == summary["trained_steps_with_signal"] == 0
    assert saved["steps_without_signal"] == 2 and saved["skipped_queries"] == 8
    err = [line for line in capsys.readouterr().err.splitlines() if "nothing was learnt" in line]
    assert len(err) == 1 and "final" in err[0]
    # no signal, no update: not even AdamW's weight decay, so final/ is the starting model bit for bit
    from tests.training.test_trainer import weights

    base = {k.split("/", 1)[1]: v for k, v in weights(tiny_bi_encoder_path).items()}
    final = weights(Path(options["output_dir"]) / "final")
    assert all(torch.equal(v, base[k.split("/", 1)[1]]) for k, v in final.items())


# ------------------------------------------------------------------------------------------- 9
def test_09_atomic_writes_follow_the_umask_or_the_replaced_file(tmp_path):
    from rag_capg.io import atomic_dir, write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_text("v1")
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o604)
        write_text(tmp_path / "kept.txt", "new")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a.json") == 0o640 and mode(tmp_path / "model") == 0o750
    assert mode(tmp_path / "model" / "w.bin") == 0o640 and mode(tmp_path / "kept.txt") == 0o604


def test_09_run_outputs_and_caches_are_readable_by_others(finished_run):
    run, cache = Path(finished_run["output_dir"]), Path(finished_run["cache_dir"])
    folders = [run, run / "final"]
    files = [run / n for n in ("config.yaml", "run_summary.json", "metrics.jsonl", "best.json", "curves.png")]
    files += [run / "final" / "modules.json", *(cache / "embeddings").glob("corpus-*.pt")]
    assert len(files) == 7
    for f in folders:
        assert stat.S_IMODE(f.stat().st_mode) == 0o755, f
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ------------------------------------------------------------------------------------------- 10
@pytest.mark.parametrize("field", ["output_dir", "cache_dir"])
def test_10_an_unwritable_folder_fails_before_any_encoding(field, tmp_path, tiny_bi_encoder_path, tiny_beir_dir,
                                                          monkeypatch):
    import rag_capg.retrieval.retriever as R

    monkeypatch.setattr(R, "_encode", lambda *a, **k: pytest.fail("encoded before checking the folders"))
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(InputError) as err:
        train(opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, **{field: str(tmp_path / "a_file" / "x")}))
    assert err.value.field == field and "a_file" in str(err.value) and "cannot write" in str(err.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_10_a_read_only_output_dir_fails_before_any_encoding(tmp_path, tiny_bi_encoder_path, tiny_beir_dir,
                                                           monkeypatch):
    import rag_capg.retrieval.retriever as R

    monkeypatch.setattr(R, "_encode", lambda *a, **k: pytest.fail("encoded before checking the folders"))
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(InputError, match="Permission denied"):
        train(opts(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, output_dir=str(tmp_path / "ro" / "run")))


def test_10_eval_checks_its_output_dir_first(tmp_path, tiny_beir_dir, tiny_bi_encoder_path, monkeypatch, capsys):
    import rag_capg.retrieval.retriever as R

    monkeypatch.setattr(R, "_encode", lambda *a, **k: pytest.fail("encoded before checking the folders"))
    (tmp_path / "a_file").write_text("in the way")
    assert cli.main(["eval", f"models=[{tiny_bi_encoder_path}]", f"dataset={tiny_beir_dir}", "candidates=20",
                     f"output_dir={tmp_path / 'a_file' / 'out'}", f"cache_dir={tmp_path / 'c'}"]) == 2
    assert "`output_dir`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 11
def _bad_bytes(path: Path, line: int, data: bytes) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = data
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize("target, line", [("corpus.jsonl", 2), ("qrels/test.tsv", 3), ("queries.jsonl", 4)])
def test_11_non_utf8_data_names_file_and_line(target, line, tmp_path, tiny_beir_dir):
    root = tmp_path / "beir"
    shutil.copytree(tiny_beir_dir, root)
    _bad_bytes(root / target, line, b'{"_id": "x", "text": "caf\xe9"}\n' if target.endswith("jsonl")
               else b"q12\td2_0\t1\xff\n")
    with pytest.raises(InputError) as err:
        load_queries(str(root), "test", load_corpus(str(root)))
    assert err.value.line == line and Path(err.value.file) == root / target and "UTF-8" in str(err.value)


@pytest.mark.parametrize("data, line, words", [(b"q1 Q0 d1 1 1.0 x\nq1 Q0 d2 2 0.5 \xe9t\xe9\n", 2, "UTF-8"),
                                              (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", 1, "binary file")])
def test_11_non_utf8_or_binary_trec_names_file_and_line(data, line, words, tmp_path):
    from rag_capg.evaluation.trec import read_trec_run

    (tmp_path / "run.trec").write_bytes(data)
    with pytest.raises(InputError, match=words) as err:
        read_trec_run(tmp_path / "run.trec")
    assert err.value.line == line and "run.trec" in str(err.value)


def test_11_non_utf8_recipe_names_the_line(tmp_path):
    from rag_capg.cli.train import GROUPS

    (tmp_path / "r.yaml").write_bytes(b"seed: 1\nlsr_prompt: caf\xe9 {query} {passage}\n")
    with pytest.raises(InputError) as err:
        parse_config(GROUPS, [str(tmp_path / "r.yaml")], prog="t")
    assert err.value.line == 2 and "r.yaml:2:" in str(err.value)


@pytest.mark.parametrize("argv, needle", [
    (["lsr=cross_encoder"], "`lsr_model`"), (["lsr=llm_judge"], "`lsr_model`"), (["lsr=bi_encoder"], "`lsr_model`"),
    (["learning_rate=nan"], "`learning_rate`: must be a finite number"),
    (["tau=.inf"], "`tau`: must be a finite number"),  # 13
    (["estimator=capgg"], "'capgg' is not one of ['vpg', 'vpg_swr', 'capg', 'capg_exact', 'top1']"),  # 13
])
def test_11_13_bad_options_are_one_line_before_anything_loads(argv, needle, capsys):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_13_argparse_takes_no_abbreviation(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--learning-rat", "0.1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --learning-rat" in capsys.readouterr().err


@pytest.mark.parametrize("spec, words", [("os:sep", "is a str, not a function"),
                                         ("collections:OrderedDict", "is a class, not a function")])
def test_11_lsr_callable_must_name_a_function(spec, words):
    from rag_capg.judges.build import JudgeArguments, build_judge

    with pytest.raises(InputError, match=words) as err:
        build_judge(JudgeArguments(lsr="callable", lsr_callable=spec))
    assert err.value.field == "lsr_callable"


# ------------------------------------------------------------------------------------------- 12
def test_12_a_fractional_grade_is_an_error_not_a_zero(tmp_path, tiny_beir_dir):
    root = tmp_path / "beir"
    shutil.copytree(tiny_beir_dir, root)
    _bad_bytes(root / "qrels" / "test.tsv", 2, b"q12\td2_0\t0.5\n")
    with pytest.raises(InputError) as err:
        load_queries(str(root), "test", load_corpus(str(root)))
    assert (err.value.line, err.value.field) == (2, "score") and "'0.5'" in str(err.value)
    _bad_bytes(root / "qrels" / "test.tsv", 2, b"q12\td2_0\t2.0\n")  # a float that is an integer is fine
    assert load_queries(str(root), "test", load_corpus(str(root))).qrels["q12"] == {"d2_0": 2}


# ------------------------------------------------------------------------------------------- 13 (the rest)
def test_13_an_empty_queries_file_is_blamed_on_itself(tmp_path, tiny_beir_dir):
    root = tmp_path / "beir"
    shutil.copytree(tiny_beir_dir, root)
    (root / "queries.jsonl").write_text("")
    with pytest.raises(InputError, match="no queries") as err:
        load_queries(str(root), "test", load_corpus(str(root)))
    assert Path(err.value.file) == root / "queries.jsonl"


def test_13_a_folder_given_as_corpus_file_is_called_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder; expected a corpus JSONL file"):
        load_corpus("", corpus_file=str(tmp_path))


def test_13_a_missing_relative_dataset_folder_is_called_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"no such folder \(.*data/scifcat\)") as err:
        load_corpus("data/scifcat")
    assert err.value.field == "dataset"


def test_13_a_bi_encoder_is_not_taken_for_a_cross_encoder(tiny_bi_encoder_path, tiny_cross_encoder_path):
    from rag_capg.judges.build import JudgeArguments, build_judge

    with pytest.raises(InputError, match="bare encoder .*BertModel.* lsr=bi_encoder") as err:
        build_judge(JudgeArguments(lsr="cross_encoder", lsr_model=str(tiny_bi_encoder_path)))
    assert err.value.field == "lsr_model"
    judge = build_judge(JudgeArguments(lsr="cross_encoder", lsr_model=str(tiny_cross_encoder_path)))
    assert judge.identity.startswith("CrossEncoderJudge:")  # a real cross-encoder still loads
