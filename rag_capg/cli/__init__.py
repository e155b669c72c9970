"""``rag-capg`` console script: one sub-command per job.

    rag-capg simulate [RECIPE.yaml] [key=value ...]   the paper's synthetic benchmark
    rag-capg train RECIPE.yaml [key=value ...]        fine-tune a retriever against a frozen LSR
    rag-capg eval ...                                 first-stage and two-stage retrieval metrics
    rag-capg export RUN_DIR --out DIR                 a sentence-transformers folder (and the Hub)

Each sub-command's module exposes ``main(argv)``; bad input raises ``InputError``, which is printed
alone (no traceback) with exit status 2; a judge that fails under ``lsr_on_error=error`` (a ``JudgeError``)
is printed the same way with exit status 1.
"""

from __future__ import annotations

import importlib
import sys

from rag_capg.errors import InputError, JudgeError

COMMANDS = {
    "simulate": ("rag_capg.simulate.cli", "the paper's synthetic benchmark (method doc section 3)"),
    "train": ("rag_capg.cli.train", "fine-tune a sentence-transformers retriever with CA-PG"),
    "eval": ("rag_capg.evaluation.evaluate", "evaluate retrievers: first-stage recall and two-stage quality"),
    "export": ("rag_capg.export.export", "export a run's encoder as a sentence-transformers folder / to the Hub"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
        print("usage: rag-capg COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nrag-capg: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except InputError as err:
        print(f"rag-capg {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except JudgeError as err:  # lsr_on_error=error: the judge failed; its message names it and the query
        print(f"rag-capg {argv[0]}: error: {err} (lsr_on_error=skip_query drops and counts such queries "
              "instead; lsr_timeout bounds a slow judge)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
