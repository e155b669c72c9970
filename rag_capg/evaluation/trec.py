"""TREC run files: ``qid Q0 docid rank score tag``, one retrieved passage per line.

`rag-capg eval` writes one per model and reads them back as models (a BM25 run, another toolkit's output),
so the reader is strict (six columns, a numeric score; an InputError names the file and line) and the writer
keeps every score exact: scores are printed in Python's shortest round-trip form, because rounding (say to 6
decimals) can turn two close scores into a tie that trec_eval then breaks by doc id, reordering the run.
"""

from __future__ import annotations

from pathlib import Path

from rag_capg.errors import InputError
from rag_capg.evaluation.metrics import Run, rank_documents
from rag_capg.io import read_text_lines


def is_trec_file(spec: str) -> bool:
    """A model spec naming a run file: *.trec / *.run, or an existing *.txt."""
    return spec.endswith((".trec", ".run")) or (spec.endswith(".txt") and Path(spec).is_file())


def read_trec_run(path: str | Path) -> Run:
    """Parse "qid Q0 docid rank score tag" lines (whitespace separated) into {qid: {docid: score}}.

    The rank column is ignored, as trec_eval ignores it: the order is score descending, ties by doc id.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("run file not found", file=path)
    run: Run = {}
    for line_no, line in read_text_lines(path, what="TREC run file"):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise InputError(f"expected 6 columns 'qid Q0 docid rank score tag', got {len(parts)}", file=path,
                             line=line_no)
        try:
            score = float(parts[4])
        except ValueError:
            raise InputError(f"score {parts[4]!r} is not a number", file=path, line=line_no, field="score") from None
        if score != score:  # NaN has no place in a ranking: trec_eval's order would be undefined
            raise InputError("score is NaN", file=path, line=line_no, field="score")
        run.setdefault(parts[0], {})[parts[2]] = score
    if not run:
        raise InputError("empty run file", file=path)
    return run


def trec_lines(run: Run, tag: str) -> str:
    """The run in TREC format, ranks in trec_eval order (score desc, doc id desc) so rank and score agree."""
    out = []
    for qid, docs in run.items():
        for rank, doc in enumerate(rank_documents(docs), 1):
            out.append(f"{qid} Q0 {doc} {rank} {float(docs[doc])!r} {tag}")
    return "\n".join(out) + "\n"
