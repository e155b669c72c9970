"""``rag-capg train RECIPE.yaml [key=value ...]``: fine-tune a retriever with CA-PG.

    rag-capg train recipes/demo.yaml
    rag-capg train recipes/scifact_cpu.yaml dataset=../shared/data/scifact max_steps=200
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m rag_capg.cli train recipes/scifact_gpu.yaml

A thin layer, as TRL's scripts are: the recipe's flat options fill three groups (the data and model, the
judge, and CAPGConfig), the first two become objects, and CAPGTrainer does the rest. The same run from
Python is the README's example.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from rag_capg.config_parsing import parse_config
from rag_capg.judges.build import JudgeArguments
from rag_capg.retrieval.inputs import TrainDataArguments
from rag_capg.training.config import CAPGConfig

GROUPS = (TrainDataArguments, JudgeArguments, CAPGConfig)


def build_trainer(data: TrainDataArguments, judge_args: JudgeArguments, args: CAPGConfig):
    """The objects the options name, handed to CAPGTrainer."""
    from rag_capg.training.trainer import CAPGTrainer

    if judge_args.lsr == "none":
        from rag_capg.errors import InputError

        raise InputError("training needs a judge: choose an lsr other than none", field="lsr")
    corpus = data.load_corpus()
    train_q = data.load_train_queries(corpus, require_labels=judge_args.lsr == "label_oracle")
    eval_q = data.load_eval_queries(corpus)
    # the judge is built by the trainer, on its accelerator's device
    return CAPGTrainer(model=data.model, judge=judge_args, args=args, corpus=corpus, train_dataset=train_q,
                       eval_dataset=eval_q, script_args={**asdict(data), **asdict(judge_args)})


def main(argv: list[str] | None = None) -> int:
    data, judge_args, args = parse_config(GROUPS, list(sys.argv[1:] if argv is None else argv),
                                          prog="rag-capg train", description=CAPGConfig.__doc__ or "")
    summary = build_trainer(data, judge_args, args).train()
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps({k: summary[k] for k in ("steps", "wall_time_s", "lsr", "estimator", "K")}))
        for name in (f"recall@{args.candidates}", "ndcg@10"):
            if name in after:
                p = (after.get("p_value") or {}).get(name)
                test = f" (p = {p:.4f}, paired randomisation test over {after['queries']} {after['split']} queries)" \
                    if p is not None else ""
                print(f"{name}: {before.get(name, float('nan')):.4f} -> {after[name]:.4f}{test}")
        print(f"run folder: {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
