"""rag-capg export: a tiny query-tower run trained by rag_capg.cli.train, exported, reloaded where rag_capg cannot
be imported, and compared with the run's own model; checkpoint selection, --force, --dry-run, the Hub
pre-flight (offline / no token / unreachable endpoint, the token never echoed) and the ONNX option."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from sentence_transformers import SentenceTransformer

from rag_capg import cli
from rag_capg.errors import InputError
from rag_capg.export.export import PROBE_TEXTS, normalize_argv, resolve_checkpoint

SENTINEL = "hf_SENTINELtokenNEVERprintMe0123456789"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bi_encoder_path, tiny_beir_dir) -> Path:
    """Three CA-PG steps in query-tower mode against the label oracle, a checkpoint and an eval each step."""
    from rag_capg.cli.train import main as train_main

    out = tmp_path_factory.mktemp("run") / "run"
    train_main([f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "max_steps=3", "batch_size=4",
                "candidates=5", "num_picks=1", "learning_rate=1e-3", "warmup_ratio=0", "save_every=1",
                "eval_every=1", "report_to=none", "progress=false", f"output_dir={out}",
                f"cache_dir={out.parent / 'cache'}"])
    return out


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert cli.main(["export", str(trained_run), "--out", str(out)]) == 0
    return out


def encode_both(model) -> dict:
    return {"query": model.encode_query(PROBE_TEXTS), "document": model.encode_document(PROBE_TEXTS)}


def test_export_reloads_without_rag_capg_and_matches_the_run(exported, trained_run, tiny_bi_encoder_path,
                                                             tmp_path):
    for path in exported.rglob("*"):  # nothing in the folder points back at this library
        assert not path.is_file() or b"rag_capg" not in path.read_bytes(), path
    types = [m["type"] for m in json.loads((exported / "modules.json").read_text())]
    types += json.loads((exported / "router_config.json").read_text())["types"].values()
    assert all(t.startswith("sentence_transformers.") for t in types), types

    # -I: no PYTHONPATH, no user site, cwd not on sys.path; -S: no .pth files, so the editable finder of
    # rag_capg is never installed. Only the venv's site-packages is added back, by hand.
    code = """
import sys
sys.path.append(sys.argv[1])
try:
    import rag_capg
except ImportError:
    pass
else:
    raise SystemExit("rag_capg is importable in the clean process")
import numpy as np
from sentence_transformers import SentenceTransformer
texts = [l for l in open(sys.argv[3]).read().split("\\n") if l]
model = SentenceTransformer(sys.argv[2], device="cpu")
assert not any(m.startswith("rag_capg") for m in sys.modules)
np.savez(sys.argv[4], query=model.encode_query(texts), document=model.encode_document(texts))
"""
    (tmp_path / "texts.txt").write_text("\n".join(PROBE_TEXTS))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, sysconfig.get_paths()["purelib"],
                           str(exported), str(tmp_path / "texts.txt"), str(tmp_path / "emb.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    clean = np.load(tmp_path / "emb.npz")

    run_final = encode_both(SentenceTransformer(str(trained_run / "final"), device="cpu"))
    for route in ("query", "document"):
        np.testing.assert_allclose(clean[route], run_final[route], atol=1e-6)
    # Both towers survived: queries go through the tuned copy, documents through the untouched base.
    base_docs = SentenceTransformer(str(tiny_bi_encoder_path), device="cpu").encode(PROBE_TEXTS)
    np.testing.assert_allclose(clean["document"], base_docs, atol=1e-6)
    assert np.abs(clean["query"] - clean["document"]).max() > 1e-3


def test_card_parses_as_hub_metadata_with_the_run_numbers(exported, trained_run):
    card = ModelCard.load(exported / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "retrieval", "rag", "capg", "query-tower"} <= set(data["tags"])
    assert "base_model" not in data  # a local path is no Hub id
    summary = json.loads((trained_run / "run_summary.json").read_text())
    _, results = model_index_to_eval_results(data["model-index"])
    by_type = {r.metric_type: r.metric_value for r in results}
    assert set(by_type) == {"ndcg_at_10", "recall_at_5"}
    assert by_type["ndcg_at_10"] == pytest.approx(summary["eval_after"]["ndcg@10"], abs=1e-5)
    assert by_type["recall_at_5"] == pytest.approx(summary["eval_after"]["recall@5"], abs=1e-5)
    assert all(r.task_type == "retrieval" and r.dataset_split == "test" for r in results)
    before, after = summary["eval_before"]["ndcg@10"], summary["eval_after"]["ndcg@10"]
    assert f"| ndcg@10 | {before:.4f} | {after:.4f} | {after - before:+.4f} |" in card.text
    for needle in ("capg", "| Candidate list size K | 5 |", "| LSR picks L | 1 |", "| Optimizer steps | 3 |",
                   "label_oracle", "encode_query", "encode_document", "@inproceedings{kiyohara2026capg",
                   "reimers-2019-sentence-bert", "| sentence-transformers |", "final model"):
        assert needle in card.text, needle
    assert str(trained_run) not in card.text  # local paths appear by their last component only


def test_checkpoint_selection(trained_run, tmp_path):
    # this run held out no dev queries (12 training queries): it chose nothing, so "best" is refused
    with pytest.raises(InputError, match="chose no checkpoint"):
        resolve_checkpoint(trained_run, "best")
    # a run that chose: final/ is its choice, best.json says which step it was
    chose = tmp_path / "chose"
    shutil.copytree(trained_run / "final", chose / "final")
    (chose / "best.json").write_text(json.dumps({"metric": 0.5, "step": 2, "name": "ndcg@10", "split": "dev"}))
    path, step, words = resolve_checkpoint(chose, "best")
    assert path == chose / "final" and step == 2 and "step 2" in words and "ndcg@10" in words
    assert resolve_checkpoint(trained_run, "2")[:2] == (trained_run / "checkpoints" / "step-2", 2)
    assert resolve_checkpoint(trained_run, "step-2")[:2] == (trained_run / "checkpoints" / "step-2", 2)
    assert resolve_checkpoint(trained_run, "final")[:2] == (trained_run / "final", None)
    with pytest.raises(InputError, match=r"available: final, 1, 2, 3"):
        resolve_checkpoint(trained_run, "7")


def test_step_export_refuses_a_full_folder_without_force(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert cli.main(["export", str(trained_run), "--out", str(out), "--checkpoint", "2"]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"

    assert cli.main(["export", str(trained_run), "--out", str(out), "--checkpoint", "2", "--force"]) == 0
    assert not (out / "keep.txt").exists()
    got = encode_both(SentenceTransformer(str(out), device="cpu"))
    want = encode_both(SentenceTransformer(str(trained_run / "checkpoints" / "step-2"), device="cpu"))
    final = SentenceTransformer(str(trained_run / "final"), device="cpu").encode_query(PROBE_TEXTS)
    np.testing.assert_allclose(got["query"], want["query"], atol=1e-6)
    assert np.abs(got["query"] - final).max() > 1e-4  # step 2 is not the final model
    row = [json.loads(line) for line in (trained_run / "eval.jsonl").read_text().splitlines()][2]
    assert row["step"] == 2
    _, results = model_index_to_eval_results(ModelCard.load(out / "README.md").data.to_dict()["model-index"])
    assert {r.metric_type: r.metric_value for r in results}["ndcg_at_10"] == pytest.approx(row["ndcg@10"])


def test_out_inside_the_run_is_refused(trained_run, capsys):
    assert cli.main(["export", str(trained_run), "--out", str(trained_run / "final"), "--force"]) == 2
    assert "outside the run folder" in capsys.readouterr().err
    assert (trained_run / "final" / "modules.json").is_file()


def test_dry_run_lists_files_and_sizes_and_writes_nothing(trained_run, exported, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["export", str(trained_run), "--out", str(out), "--push-to-hub", "someone/model", "--dry-run"]
    assert cli.main(argv) == 0  # HF_HUB_OFFLINE=1 here: a dry run needs neither network nor token
    stdout = capsys.readouterr().out
    assert "someone/model" in stdout and "nothing uploaded" in stdout
    listed = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in stdout.splitlines()
              if line.startswith("  ") and "total" not in line}
    real = {p.relative_to(exported).as_posix(): p.stat().st_size for p in exported.rglob("*") if p.is_file()}
    assert set(listed) == set(real)
    assert all(listed[name] == size for name, size in real.items() if name != "README.md")
    assert not out.exists()


def run_cli(args: list[str], env_extra: dict, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_HOME": str(home), "OMP_NUM_THREADS": "1", **env_extra})
    return subprocess.run([sys.executable, "-m", "rag_capg.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("env_extra, message", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": SENTINEL}, "offline mode is on"),
    ({"HF_HUB_OFFLINE": "0"}, "no Hugging Face token found"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": SENTINEL, "HF_ENDPOINT": "http://127.0.0.1:9"}, "is unreachable"),
])
def test_push_preflight_fails_with_one_message_and_never_leaks_the_token(trained_run, tmp_path, env_extra,
                                                                           message):
    out = tmp_path / "out"
    proc = run_cli(["export", str(trained_run), "--out", str(out), "--push-to-hub", "someone/model"], env_extra,
                   tmp_path / "hf_home")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0] and "Nothing was uploaded" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert SENTINEL not in proc.stdout + proc.stderr
    assert not out.exists()  # failed before anything was built
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path


ONNX_CHECK = """
import sys
sys.path += sys.argv[1:3]
import numpy as np
from rag_capg.export.onnx import INT8_NAME, OnnxEncoder
texts = [l for l in open(sys.argv[4], encoding="utf-8").read().split("\\n---\\n")]
out = {}
for name, file_name in (("float32", "model.onnx"), ("int8", INT8_NAME)):
    encoder = OnnxEncoder(sys.argv[3], file_name=file_name, num_threads=1)
    for task in ("query", "document"):
        out[f"{name}_{task}_batch"] = encoder.encode(texts, task)
        out[f"{name}_{task}_single"] = np.stack([encoder.encode(t, task) for t in texts])
assert not [m for m in sys.modules if m.startswith(("sentence_transformers", "optimum"))]
np.savez(sys.argv[5], **out)
"""


def test_onnx_towers_match_torch_in_a_clean_process(trained_run, tiny_bi_encoder_path, tmp_path, capsys):
    """--onnx --onnx-quantize on a query-tower run: an ONNX file per tower in sentence-transformers' layout,
    read back by OnnxEncoder in a fresh interpreter (no sentence-transformers, no optimum, the folder's torch
    weights deleted) and matched to the run's torch model on the awkward texts, batched and one by one."""
    from rag_capg.export.onnx_export import CHECK_TEXTS

    out = tmp_path / "o"
    assert cli.main(["export", str(trained_run), "--out", str(out), "--onnx", "--onnx-quantize"]) == 0
    printed = capsys.readouterr().out
    for tower in ("query_0_Transformer", "document_0_Transformer"):
        for name in ("model.onnx", "model_qint8_quantized.onnx"):
            assert (out / tower / "onnx" / name).is_file()
            assert f"{tower}/onnx/{name}" in printed  # in the listing
    assert "ONNX float32: max |ONNX - torch|" in printed and "ONNX int8:" in printed

    onnx_only = tmp_path / "onnx_only"
    shutil.copytree(out, onnx_only, ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "texts.txt").write_text("\n---\n".join(CHECK_TEXTS), encoding="utf-8")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", ONNX_CHECK, sysconfig.get_paths()["purelib"], str(REPO),
                           str(onnx_only), str(tmp_path / "texts.txt"), str(tmp_path / "emb.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "emb.npz")

    run = SentenceTransformer(str(trained_run / "final"), device="cpu")
    want = {"query": run.encode_query(CHECK_TEXTS), "document": run.encode_document(CHECK_TEXTS)}
    int8_gap = 0.0
    for task in ("query", "document"):
        for how in ("batch", "single"):
            np.testing.assert_allclose(got[f"float32_{task}_{how}"], want[task], atol=1e-4)
            int8_gap = max(int8_gap, float(np.abs(got[f"int8_{task}_{how}"] - want[task]).max()))
    # both towers: queries through the tuned copy, documents through the untouched base
    base = SentenceTransformer(str(tiny_bi_encoder_path), device="cpu").encode(CHECK_TEXTS)
    np.testing.assert_allclose(got["float32_document_batch"], base, atol=1e-4)
    assert np.abs(got["float32_query_batch"] - got["float32_document_batch"]).max() > 1e-3

    card = (out / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in card.splitlines()
            if line.startswith("| ONNX ") or line.startswith("| torch float32 |")}
    assert set(rows) == {"torch float32", "ONNX float32", "ONNX int8"}, card
    assert float(rows["ONNX float32"][0]) <= 1e-4
    assert float(rows["ONNX int8"][0]) == pytest.approx(int8_gap, rel=0.05)  # the card's figure, remeasured
    for needle in ("query_0_Transformer/onnx/model.onnx", "document_0_Transformer/onnx/model_qint8_quantized.onnx",
                   "from rag_capg.export.onnx import OnnxEncoder", 'backend="onnx")` reads this layout'):
        assert needle in card, needle


def test_onnx_refuses_a_module_it_cannot_run_before_writing(tiny_bi_encoder_path, tmp_path, capsys):
    from sentence_transformers.sentence_transformer.modules import Dense

    model = SentenceTransformer(str(tiny_bi_encoder_path), device="cpu")
    model.append(Dense(model.get_embedding_dimension(), 8))
    model.save(str(tmp_path / "run" / "final"))
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "['Transformer', 'Pooling', 'Dense']" in err and str(tmp_path / "run" / "final") in err, err
    assert not (tmp_path / "o").exists()


def test_onnx_without_its_packages_names_the_install_command(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` meets when it is missing
    assert cli.main(["export", str(trained_run), "--out", str(tmp_path / "o"), "--onnx"]) == 2
    assert "pip install 'rag-capg[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["export", str(trained_run), "--out", str(tmp_path / "o"), "--onnx-quantize"]) == 2
    assert "--onnx-quantize needs --onnx" in capsys.readouterr().err


def test_argv_positional_run_dir_and_bare_flags(tmp_path):
    assert normalize_argv(["runs/a", "--out", "x", "--force", "--private", "false", "--dry-run"]) == [
        "--run-dir", "runs/a", "--out", "x", "--force", "true", "--private", "false", "--dry-run", "true"]
    assert normalize_argv(["checkpoint=best", "runs/a"]) == ["--run-dir", "runs/a", "checkpoint=best"]
    with pytest.raises(InputError, match="expected one RUN_DIR"):
        normalize_argv(["a", "b"])


def test_help_documents_every_option(capsys):
    import dataclasses

    from rag_capg.export.export import ExportConfig

    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(ExportConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "rag-capg export RUN_DIR --out DIR" in text


def test_bad_options_are_input_errors(trained_run, capsys):
    assert cli.main(["export", str(trained_run), "--out", "x", "--checkpoint", "latest"]) == 2
    assert "is not 'final', 'best' or a step number" in capsys.readouterr().err
    assert cli.main(["export", str(trained_run), "--out", "x", "--push-to-hub", "bad/repo/id"]) == 2
    assert cli.main(["export", str(trained_run), "--out", "x", "--private"]) == 2
    assert "only apply with --push-to-hub" in capsys.readouterr().err
    assert cli.main(["export", str(trained_run / "nope"), "--out", "x"]) == 2


def test_push_wiring_private_revision_pr(trained_run, monkeypatch, capsys):
    """The upload itself (sentence-transformers' push_to_hub), with HfApi's network methods replaced by
    recorders (no Hub here): one repo creation with --private, the branch for --revision, one upload_folder
    commit holding the whole model, with the token only inside the client."""
    from huggingface_hub import HfApi, constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kw: calls.append(("whoami", token)) or
                        {"name": "someone"})
    from huggingface_hub.hf_api import RepoUrl

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw))
                        or RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id,
                                                                                          kw)))

    class Info:
        pr_url = "https://hub.example/someone/model/discussions/1"

    def upload_folder(self, **kw):
        files = sorted(p.relative_to(kw["folder_path"]).as_posix() for p in Path(kw["folder_path"]).rglob("*")
                       if p.is_file())
        calls.append(("upload_folder", kw["repo_id"], kw["revision"], kw["create_pr"], self.token, files))
        return Info()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    argv = ["export", str(trained_run), "--push-to-hub", "someone/model", "--private", "--revision", "tuned",
            "--create-pr"]
    assert cli.main(argv) == 0
    names = [c[0] for c in calls]
    assert names == ["whoami", "create_repo", "create_branch", "upload_folder"]
    assert calls[1][2]["private"] is True and calls[1][2]["exist_ok"] is True
    assert calls[2][2]["branch"] == "tuned"
    _, repo, revision, create_pr, token, files = calls[3]
    assert (repo, revision, create_pr, token) == ("someone/model", "tuned", True, SENTINEL)
    assert {"README.md", "modules.json", "router_config.json", "query_0_Transformer/model.safetensors",
            "document_0_Transformer/model.safetensors"} <= set(files)
    out = capsys.readouterr()
    assert "discussions/1" in out.out and SENTINEL not in out.out + out.err
