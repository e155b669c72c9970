from dataclasses import dataclass, field
from typing import Literal

import pytest

from rag_capg.config_parsing import build_parser, parse_config
from rag_capg.errors import InputError


@dataclass
class ToyConfig:
    steps: int = field(default=10, metadata={"help": "number of steps"})
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    estimator: Literal["capg", "vpg"] = field(default="capg", metadata={"help": "which estimator"})
    sizes: list[int] = field(default_factory=lambda: [5, 10], metadata={"help": "candidate sizes"})
    name: str | None = field(default=None, metadata={"help": "optional name"})
    verbose: bool = field(default=False, metadata={"help": "print more"})


def test_precedence_defaults_recipe_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 20\nlr: 0.5\nsizes: [1, 2, 3]\n")
    cfg = parse_config(ToyConfig, [str(recipe), "lr=0.25", "--estimator", "vpg", "verbose=true"], prog="t")
    assert (cfg.steps, cfg.lr, cfg.estimator, cfg.sizes, cfg.verbose) == (20, 0.25, "vpg", [1, 2, 3], True)
    assert cfg.name is None
    assert parse_config(ToyConfig, ["--sizes", "7", "8"], prog="t").sizes == [7, 8]
    assert parse_config(ToyConfig, ["sizes=4,5"], prog="t").sizes == [4, 5]


def test_bad_literal_in_recipe_names_file_and_field(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("estimator: reinforce\n")
    with pytest.raises(InputError) as err:
        parse_config(ToyConfig, [str(recipe)], prog="t")
    assert "bad.yaml" in str(err.value) and "`estimator`" in str(err.value) and "reinforce" in str(err.value)


@pytest.mark.parametrize("argv, field_name", [(["steps=ten"], "steps"), (["steps=1.5"], "steps"),
                                              (["colour=red"], "colour"), (["verbose=maybe"], "verbose")])
def test_bad_overrides(argv, field_name):
    with pytest.raises(InputError) as err:
        parse_config(ToyConfig, argv, prog="t")
    assert f"`{field_name}`" in str(err.value)


def test_broken_yaml_names_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("steps: 3\nlr: [0.1\n")
    with pytest.raises(InputError) as err:
        parse_config(ToyConfig, [str(recipe)], prog="t")
    assert "broken.yaml:" in str(err.value)


def test_help_lists_every_field_with_its_help():
    text = build_parser(ToyConfig, "t", "").format_help()
    for option, help_text in [("--steps", "number of steps"), ("--estimator", "which estimator"),
                              ("--sizes", "candidate sizes"), ("--verbose", "print more")]:
        assert option in text and help_text in text
    assert "{capg,vpg}" in text
