"""``rag-capg simulate``: outputs, --help, recipes and bad options."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from rag_capg.cli import main as rag_capg_main
from rag_capg.config_parsing import parse_config
from rag_capg.simulate.cli import SimulateConfig, main

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_csv_png_summary(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = [f"output_dir={out}", "estimators=[capg,top1,vpg]", "candidates=[3,5]", "seeds=[0,1]",
            "steps=40", "eval_every=20", "eval_contexts=300", "num_users=50", "num_items=60", "batch_size=16",
            "progress=false"]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "values.csv").open()))
    assert list(rows[0]) == ["estimator", "K", "seed", "step", "policy_value"]
    finished = [r for r in rows if r["step"] == "40"]
    assert {(r["estimator"], r["K"], r["seed"]) for r in rows} == {
        (e, k, s) for e in ("capg", "top1", "vpg") for k in ("3", "5") for s in ("0", "1")}
    assert len(rows) <= 3 * 2 * 2 * 3 and len(finished) >= 8  # V-PG may stop early, the others do not
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["steps"] == 40 and set(summary["oracle"]) == {"3", "5"}
    assert len(summary["runs"]) == 12 and len(summary["table"]) == 6
    printed = capsys.readouterr().out
    assert "steps to 95% of oracle" in printed and "CA-PG" in printed and "TOP1" in printed
    assert not list(out.glob(".*"))  # atomic writes leave no temporary files behind


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        rag_capg_main(["simulate", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(SimulateConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f.metadata["help"].split()[0] in text


@pytest.mark.parametrize("argv, needles", [
    (["lsr=bogus"], ["field `lsr`", "'bogus'"]),
    (["steps=0"], ["field `steps`: must be >= 1"]),
    (["candidates=[5,2000]"], ["field `candidates`", "K=2000"]),
    (["estimators=[capg,reinforce]"], ["field `estimators`", "reinforce"]),
    (["no_such_option=1"], ["field `no_such_option`: unknown option"]),
])
def test_bad_option_exits_2_with_a_clear_message(argv, needles, capsys):
    assert rag_capg_main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rag-capg simulate: error:") and all(n in err for n in needles), err


def test_bad_flag_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        rag_capg_main(["simulate", "--lsr", "bogus"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["simulate.yaml", "simulate_quick.yaml"])
def test_recipes_parse(recipe):
    cfg = parse_config(SimulateConfig, [str(ROOT / "recipes" / recipe)], prog="rag-capg simulate")
    assert 20 in cfg.candidates and "capg" in cfg.estimators
    if recipe == "simulate.yaml":  # the paper's setup
        assert (cfg.steps, cfg.batch_size, cfg.eval_every, cfg.eval_contexts) == (300_000, 128, 1000, 10_000)
        assert cfg.candidates == [5, 10, 20] and len(cfg.estimators) == 5
