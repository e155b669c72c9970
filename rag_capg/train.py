"""``rag-capg train RECIPE.yaml [key=value ...]``: fine-tune a retriever with CA-PG (see rag_capg.trainer).

    rag-capg train recipes/demo.yaml
    rag-capg train recipes/scifact_cpu.yaml dataset=../shared/data/scifact max_steps=200
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m rag_capg.cli train recipes/scifact_gpu.yaml
"""

from __future__ import annotations

import json
import sys

from rag_capg.config_parsing import parse_config
from rag_capg.train_config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    config = parse_config(TrainConfig, list(sys.argv[1:] if argv is None else argv), prog="rag-capg train")
    from rag_capg.trainer import train  # heavy imports (torch, transformers) only after the config is valid

    summary = train(config)
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({k: summary[k] for k in ("steps", "wall_time_s", "lsr", "estimator", "K")}))
        for name in (f"recall@{config.candidates}", "ndcg@10"):
            if name in after:
                print(f"{name}: {before.get(name, float('nan')):.4f} -> {after[name]:.4f}")
        print(f"run folder: {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
