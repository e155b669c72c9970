"""The options of `rag-capg train` (CAPGConfig and the shared groups): every one documented, bad values rejected
naming the field, shipped recipes valid, boolean flags alone, no abbreviations."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from rag_capg.cli import main as cli_main
from rag_capg.cli.train import GROUPS
from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError

RECIPES = Path(__file__).resolve().parents[2] / "rag_capg" / "recipes"


def test_every_field_has_help_and_string_options_are_literal():
    hints = {k: v for cls in GROUPS for k, v in typing.get_type_hints(cls).items()}
    for f in (f for cls in GROUPS for f in dataclasses.fields(cls)):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        tp = hints[f.name]
        # A free-form string is allowed only for names, paths and templates; everything else is a Literal.
        if tp in (str, str | None):
            # (and FAISS's own index / parameter specifications)
            assert any(w in f.name for w in ("model", "dataset", "file", "split", "dir", "prompt", "callable",
                                             "index", "params")), f.name


@pytest.mark.parametrize("override, field", [
    ("tau=0", "tau"), ("candidates=0", "candidates"), ("num_picks=30", "num_picks"),
    ("baseline=group_min_shift", "baseline"), ("lsr=cross_encoder", "lsr_model"),
    ("lsr=callable", "lsr_callable"), ("lsr_callable=nocolon", None),
    ("gradient_accumulation_steps=3", "batch_size"), ("warmup_ratio=2", "warmup_ratio"),
    ("lsr_prompt=no placeholders", "lsr_prompt"), ("lsr_temperature=-1", "lsr_temperature"),
    ("estimator=reinforce", "estimator"), ("mode=both", "mode"), ("max_steps=0", "max_steps"),
    ("mixed_precision=fp8", "mixed_precision"), ("softmax=top_m", "top_m"),
])
def test_bad_values_raise_input_error_naming_the_field(override, field):
    argv = [override] + (["lsr=callable"] if override.startswith("lsr_callable") else [])
    with pytest.raises(InputError) as err:
        parse_config(GROUPS, argv + (["top_m=5"] if "softmax" in override else []), prog="t")
    assert err.value.field == (field or "lsr_callable")


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("candidates: 7\nlearning_rate: 1.0e-4\nlsr: bi_encoder\nlsr_model: x\n")
    _, judge, cfg = parse_config(GROUPS, [str(recipe), "candidates=9", "--group-size", "3"], prog="t")
    assert (cfg.candidates, cfg.learning_rate, judge.lsr, cfg.group_size) == (9, 1e-4, "bi_encoder", 3)


@pytest.mark.parametrize("name", ["demo.yaml", "scifact_cpu.yaml", "scifact_gpu.yaml", "label_free.yaml"])
def test_shipped_recipes_parse(name):
    data, judge, cfg = parse_config(GROUPS, [str(RECIPES / name)], prog="t")
    assert cfg.candidates == 20 and data.model
    assert cfg.mode == ("both_towers" if "gpu" in name else "query_tower")
    if name == "label_free.yaml":  # a fused judge of BM25 and the starting model, nothing to download
        assert judge.lsr == "ensemble" and [m["lsr"] for m in judge.lsr_members] == ["bm25", "bi_encoder"]
        assert data.eval_split == "" and cfg.dev_judge_depth == 100


def test_accelerate_configs_exist():
    import yaml

    for name in ("single_gpu", "multi_gpu", "multi_node"):
        cfg = yaml.safe_load((RECIPES / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["num_processes"] >= 1 and "distributed_type" in cfg


def test_cli_exits_2_naming_the_field(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("tau: -1\n")
    assert cli_main(["train", str(recipe)]) == 2
    assert "tau" in capsys.readouterr().err
    assert cli_main(["train", "estimator=nope"]) == 2
    assert "estimator" in capsys.readouterr().err


def test_a_boolean_flag_alone_means_true_and_names_are_not_abbreviated(capsys):
    _, _, cfg = parse_config(GROUPS, ["--resume", "--eval-before", "false"], prog="t")
    assert cfg.resume is True and cfg.eval_before is False
    with pytest.raises(SystemExit):
        parse_config(GROUPS, ["--learning-rat", "0.1"], prog="t")
    assert "unrecognized arguments: --learning-rat" in capsys.readouterr().err


def test_shipped_recipes_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for token in ("demo", "demo.yaml", "recipes/demo.yaml"):
        data, _, cfg = parse_config(GROUPS, [token], prog="t")
        assert data.dataset == "demo:stdlib" and cfg.output_dir == "runs/demo"
    with pytest.raises(InputError, match="recipes shipped with rag-capg: .*scifact_cpu"):
        parse_config(GROUPS, ["nope.yaml"], prog="t")
