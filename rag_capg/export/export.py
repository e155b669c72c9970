"""``rag-capg export RUN_DIR --out DIR [--push-to-hub ORG/NAME]``: a run's encoder as a plain
sentence-transformers folder, with a model card, optionally ONNX towers (rag_capg.export.onnx_export),
optionally on the Hub.

The folder is re-saved by sentence-transformers itself and must load with ``SentenceTransformer(DIR)`` on a
machine without rag-capg: every module (a query-tower run's Router, its two Transformer towers, the
poolings) is a sentence-transformers class, which is checked, and the export is verified by reloading it
and comparing ``encode_query`` / ``encode_document`` with the run's model on probe texts.

Order of work, so that a failure costs nothing: parse, find the checkpoint, refuse a non-empty --out, check
the Hub (offline mode, token, whoami) - all before a model is loaded; then build the folder in a temporary
directory and rename it into place (rag_capg.io.atomic_dir); then upload it as one commit. The token is
read with huggingface_hub.get_token() (HF_TOKEN, then the cached login) and never printed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from rag_capg.config_parsing import parse_config
from rag_capg.errors import InputError
from rag_capg.export.model_card import build_model_card, lookup
from rag_capg.io import atomic_dir, read_log_rows

PROBE_TEXTS = ["why do cats purr?", "Bees turn nectar into honey in the hive.", "a b c",
               "Copper conducts electricity well because its outer electron moves freely."]
PORTABLE_PREFIX = "sentence_transformers."
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


@dataclass
class ExportConfig:
    """Export a run's encoder as a sentence-transformers folder (with a model card), optionally to the Hub.

    usage: rag-capg export RUN_DIR --out DIR [--checkpoint final|best|N] [--push-to-hub ORG/NAME [--private]
                          [--revision BRANCH] [--create-pr]] [--dry-run] [--force] [--onnx [--onnx-quantize]]"""

    run_dir: str = field(default="", metadata={"help": (
        "the run folder written by `rag-capg train` (may also be given as the first positional argument)")})
    out: str | None = field(default=None, metadata={"help": (
        "folder to write the model into; refused if it exists and is not empty, unless --force. Optional "
        "with --push-to-hub (a temporary folder is uploaded then)")})
    checkpoint: str = field(default="final", metadata={"help": (
        "which weights: 'final' (RUN_DIR/final), 'best' (RUN_DIR/best or the step named by best.json) or a "
        "step number N (RUN_DIR/checkpoints/step-N)")})
    push_to_hub: str | None = field(default=None, metadata={"help": "upload to this Hub repository, ORG/NAME"})
    private: bool = field(default=False, metadata={"help": "create the Hub repository as private"})
    revision: str | None = field(default=None, metadata={"help": "push to this branch (created if missing)"})
    create_pr: bool = field(default=False, metadata={"help": "open a pull request instead of committing"})
    dry_run: bool = field(default=False, metadata={"help": (
        "build the folder in a temporary place, list its files and sizes, write and upload nothing")})
    force: bool = field(default=False, metadata={"help": "replace a non-empty --out folder"})
    onnx: bool = field(default=False, metadata={"help": (
        "also export each tower's transformer with torch.onnx to <module folder>/onnx/model.onnx and check "
        "the embeddings of rag_capg.export.onnx.OnnxEncoder against torch's; needs `pip install "
        "'rag-capg[onnx]'` (onnx, onnxruntime, onnxscript)")})
    onnx_quantize: bool = field(default=False, metadata={"help": (
        "with --onnx, also write onnx/model_qint8_quantized.onnx (onnxruntime dynamic int8) and measure its "
        "difference from torch and its speed")})
    onnx_atol: float = field(default=1e-4, metadata={"help": "largest allowed |ONNX - torch| embedding gap"})
    onnx_min_cosine: float = field(default=0.95, metadata={"help": (
        "smallest allowed cosine between an int8 embedding and torch's (--onnx-quantize)")})
    base_model: str | None = field(default=None, metadata={"help": (
        "Hub id of the base model for the card's metadata (default: the run's model when it is a Hub id)")})
    license: str | None = field(default=None, metadata={"help": "license for the card, e.g. apache-2.0"})

    def __post_init__(self):
        if not self.run_dir:
            raise InputError("give the run folder: rag-capg export RUN_DIR --out DIR", field="run_dir")
        if self.checkpoint not in ("final", "best") and not self.checkpoint.removeprefix("step-").isdigit():
            raise InputError(f"{self.checkpoint!r} is not 'final', 'best' or a step number", field="checkpoint")
        if not self.out and not self.push_to_hub and not self.dry_run:
            raise InputError("nothing to do: give --out DIR, --push-to-hub ORG/NAME or --dry-run", field="out")
        if self.onnx_quantize and not self.onnx:
            raise InputError("--onnx-quantize needs --onnx", field="onnx_quantize")
        if (self.private or self.revision or self.create_pr) and not self.push_to_hub:
            raise InputError("--private / --revision / --create-pr only apply with --push-to-hub",
                             field="push_to_hub")
        if self.push_to_hub:
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except ValueError as err:
                raise InputError(str(err), field="push_to_hub") from None


def normalize_argv(argv: list[str]) -> list[str]:
    """Let ``RUN_DIR`` be positional and boolean flags stand alone (``--force``) for parse_config, which
    reads positional tokens as a recipe or key=value and wants a value after every ``--flag``."""
    hints = typing.get_type_hints(ExportConfig)
    bools = {name for name, tp in hints.items() if tp is bool}
    out, positional, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-"):
            name = tok.lstrip("-").split("=", 1)[0].replace("-", "_")
            if "=" in tok or tok in ("-h", "--help"):
                out.append(tok)
            elif name in bools and (i + 1 == len(argv) or argv[i + 1].lower() not in _BOOL_WORDS):
                out += [tok, "true"]
            else:
                out += argv[i:i + 2]
                i += 1
        elif ("=" in tok or tok.endswith((".yaml", ".yml"))) and not Path(tok).is_dir():
            out.append(tok)
        else:
            positional.append(tok)
        i += 1
    if len(positional) > 1:
        raise InputError(f"expected one RUN_DIR, got {positional}")
    return (["--run-dir", positional[0]] if positional else []) + out


# ---- the run folder ---------------------------------------------------------------------------------------

def is_model_dir(path: Path) -> bool:
    return (path / "modules.json").is_file()


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON: {err.msg}", file=path, line=err.lineno) from None
    return value if isinstance(value, dict) else {}


def resolve_checkpoint(run_dir: Path, checkpoint: str) -> tuple[Path, int | None, str]:
    """(model folder, its step or None, a description for the card) of ``final`` / ``best`` / a step."""
    if not run_dir.is_dir():
        raise InputError("run folder not found", file=run_dir)
    steps = sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
                   if p.name.removeprefix("step-").isdigit())
    available = ", ".join(["final"] * is_model_dir(run_dir / "final") + [str(s) for s in steps]) or "none"
    if checkpoint == "final":
        path, step, words = run_dir / "final", None, "final model"
    elif checkpoint == "best":
        best = read_json(run_dir / "best.json")
        step = lookup([best], "step", "best_step", "global_step")
        step = int(step) if isinstance(step, (int, str)) and str(step).isdigit() else None
        pointer = lookup([best], "path", "checkpoint", "dir")
        if is_model_dir(run_dir / "best"):  # a run still in progress (or from before final/ was the choice)
            path = run_dir / "best"
        elif best and is_model_dir(run_dir / "final"):  # a finished run ships its choice as final/
            path = run_dir / "final"
        elif not best:
            raise InputError("this run held out no dev queries, so it chose no checkpoint: final/ is its last "
                             "step (export final, or a step number)", file=run_dir, field="checkpoint")
        elif pointer:
            path = Path(pointer) if Path(pointer).is_absolute() else run_dir / pointer
        elif step is not None:
            path = run_dir / "checkpoints" / f"step-{step}"
        else:
            raise InputError("the run has no best/ folder and best.json names no step", file=run_dir)
        metric = lookup([best], "name", "metric_name", "metric_for_best")
        words = f"best checkpoint (step {step if step is not None else 'unknown'}" + (
            f", by {metric})" if isinstance(metric, str) else ")")
    else:
        step = int(checkpoint.removeprefix("step-"))
        path, words = run_dir / "checkpoints" / f"step-{step}", f"checkpoint at step {step}"
    if not is_model_dir(path):
        raise InputError(f"no sentence-transformers model there (available: {available})", file=path)
    return path, step, words


def pick_evals(run_dir: Path, summary: dict, config: dict, step: int | None
               ) -> tuple[dict | None, dict | None, str | None]:
    """(metrics before training, metrics of the exported checkpoint, split) from eval.jsonl / run_summary."""
    rows = read_log_rows(run_dir / "eval.jsonl")
    splits = [r.get("split") for r in rows if r.get("split")]
    split = config.get("eval_split") if config.get("eval_split") in splits else (
        max(set(splits), key=splits.count) if splits else config.get("eval_split") or None)
    rows = [r for r in rows if r.get("split", split) == split and isinstance(r.get("step"), int)]

    def from_summary(*names):
        value = lookup([summary], *names)
        if isinstance(value, dict) and split in value and isinstance(value[split], dict):
            value = value[split]  # {"test": {...}} nested by split
        return value if isinstance(value, dict) else None

    before = next((r for r in rows if r["step"] == 0), None) or from_summary("eval_before", "eval.before")
    if step is not None:
        after = next((r for r in reversed(rows) if r["step"] == step), None)
    else:
        after = from_summary("eval_after", "eval.after") or (max(rows, key=lambda r: r["step"]) if rows else None)
    return before, after, split


def export_versions(onnx: bool = False) -> dict[str, str]:
    versions = {}
    for dist in ("rag-capg", "sentence-transformers", "transformers", "torch", "huggingface_hub", "tokenizers",
                 *(("onnx", "onnxruntime", "onnxscript") if onnx else ())):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    versions["python"] = sys.version.split()[0]
    return versions


# ---- the Hub ----------------------------------------------------------------------------------------------

def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def check_hub_access() -> tuple[str, str]:
    """Fail with one message unless we are online, hold a token and the Hub accepts it: (token, user)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise InputError("cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it and retry. "
                         "Nothing was uploaded.")
    token = get_token()
    if not token:
        raise InputError("cannot push: no Hugging Face token found; set HF_TOKEN or run `hf auth login`. "
                         "Nothing was uploaded.")
    try:
        who = HfApi().whoami(token=token)
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        reason = "the token was rejected" if status == 401 else f"the Hub answered HTTP {status}"
        raise InputError(f"cannot push: {reason} ({constants.ENDPOINT}/api/whoami-v2). Nothing was uploaded."
                         ) from None
    except Exception as err:  # connection refused, DNS, TLS, timeouts: all mean "no network"
        detail = _scrub(str(err).splitlines()[0] if str(err) else "", token)[:200]
        raise InputError(f"cannot push: the Hugging Face Hub at {constants.ENDPOINT} is unreachable "
                         f"({type(err).__name__}: {detail}). Nothing was uploaded.") from None
    return token, str(who.get("name", "unknown"))


def push_folder(folder: Path, cfg: ExportConfig, token: str) -> str:
    """Upload the finished folder with sentence-transformers' own push_to_hub (local_model_path: the folder
    as built and verified, our card included), which makes one Hub commit: every file lands or none does."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    try:
        url = model.push_to_hub(cfg.push_to_hub, token=token, private=cfg.private, local_model_path=str(folder),
                                exist_ok=True, revision=cfg.revision, create_pr=cfg.create_pr,
                                commit_message="Upload rag-capg fine-tuned retriever")
    except Exception as err:
        raise InputError(f"upload to {cfg.push_to_hub} failed: {type(err).__name__}: "
                         f"{_scrub(str(err), token)[:300]}") from None
    return str(url or cfg.push_to_hub)


# ---- building the folder ----------------------------------------------------------------------------------

def module_types(folder: Path) -> list[str]:
    """Class paths of every module of a saved model, Router sub-modules included."""
    types = [m.get("type", "") for m in json.loads((folder / "modules.json").read_text(encoding="utf-8"))]
    for router_config in folder.rglob("router_config.json"):
        types += list(json.loads(router_config.read_text(encoding="utf-8")).get("types", {}).values())
    return types


def embed(model, texts: list[str]) -> dict:
    return {"query": model.encode_query(texts, convert_to_numpy=True),
            "document": model.encode_document(texts, convert_to_numpy=True)}


def max_gap(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def is_query_tower(folder: Path) -> bool:
    return any(
        {"query", "document"} <= set(json.loads(p.read_text(encoding="utf-8")).get("structure", {}))
        for p in folder.rglob("router_config.json"))


def build_folder(src: Path, dest: Path, card: typing.Callable[..., str], cfg: ExportConfig) -> None:
    """Re-save the run's model into ``dest``, verify the reload (and the ONNX towers), write the card."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(src), device="cpu")
    model.save(str(dest), create_model_card=False)
    foreign = [t for t in module_types(dest) if not t.startswith(PORTABLE_PREFIX)]
    if foreign:
        raise InputError(f"modules {foreign} are not sentence-transformers classes; the folder would not load "
                         "with SentenceTransformer alone", file=src)
    reference = embed(model, PROBE_TEXTS)
    gap = max_gap(reference, embed(SentenceTransformer(str(dest), device="cpu"), PROBE_TEXTS))
    if gap > 1e-5:
        raise RuntimeError(f"the re-saved model differs from {src} (max |gap| {gap:.2e})")
    onnx_report = export_onnx(dest, model, cfg, src) if cfg.onnx else None
    text = card(query_tower=is_query_tower(dest), embedding_dim=model.get_embedding_dimension(), onnx=onnx_report)
    (dest / "README.md").write_text(text, encoding="utf-8")


def require_onnx() -> None:
    try:  # onnxscript: the torch.onnx dynamo exporter's graph builder
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise InputError(f"--onnx needs onnx, onnxruntime and onnxscript ({err}): pip install 'rag-capg[onnx]'",
                         field="onnx") from None


def export_onnx(dest: Path, model, cfg: ExportConfig, src: Path) -> dict:
    """ONNX files for every Transformer module of ``dest`` (both towers of a Router), then OnnxEncoder checked
    against the torch ``model`` and timed; the figures go into the card. ``src``: the run's model folder, which
    error messages name (``dest`` is still a temporary folder)."""
    from rag_capg.export.onnx import read_layout
    from rag_capg.export.onnx_export import check_towers, export_towers

    try:
        read_layout(dest)
    except ValueError as err:
        raise InputError(f"--onnx: {str(err).replace(str(dest), str(src))}", field="onnx") from None
    files = export_towers(dest, model, quantize=cfg.onnx_quantize)
    report = check_towers(dest, model, atol=cfg.onnx_atol, quantized=cfg.onnx_quantize,
                          min_cosine=cfg.onnx_min_cosine)
    report["files"] = files
    for kind, gap in report["max_abs_diff"].items():
        print(f"ONNX {kind}: max |ONNX - torch| {gap:.1e}, min cosine {report['min_cosine'][kind]:.6f}, "
              f"{report['timed_texts']} texts in {report['seconds'][kind]:.2f} s (torch "
              f"{report['seconds']['torch']:.2f} s, {report['threads']} threads)")
    return report


def list_files(folder: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()]


def print_listing(folder: Path, header: str) -> None:
    files = list_files(folder)
    print(header)
    for name, size in files:
        print(f"  {size:>14,d}  {name}")
    print(f"  {sum(s for _, s in files):>14,d}  total ({len(files)} files)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(ExportConfig, normalize_argv(argv), prog="rag-capg export",
                       description=ExportConfig.__doc__ or "")
    run_dir = Path(cfg.run_dir)
    src, step, words = resolve_checkpoint(run_dir, cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else None
    if out is not None and not cfg.dry_run:
        if out.exists() and not out.is_dir():
            raise InputError("--out exists and is not a folder", file=out)
        if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents or \
                out.resolve() in run_dir.resolve().parents:
            raise InputError("--out must lie outside the run folder (replacing it would delete the run)", file=out)
        if out.is_dir() and any(out.iterdir()) and not cfg.force:
            raise InputError("--out is not empty; pass --force to replace it", file=out)
    if cfg.onnx:
        require_onnx()
    token = None
    if cfg.push_to_hub and not cfg.dry_run:
        token, user = check_hub_access()
        print(f"Hub: logged in as {user}")

    summary, config = read_json(run_dir / "run_summary.json"), {}
    if (run_dir / "config.yaml").is_file():
        loaded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    before, after, split = pick_evals(run_dir, summary, config, step)
    model_id = cfg.push_to_hub or (out.name if out else "rag-capg-retriever")

    def card(query_tower: bool, embedding_dim: int | None, onnx: dict | None) -> str:
        return build_model_card(summary=summary, config=config, eval_before=before, eval_after=after,
                                eval_split=split, checkpoint=words, query_tower=query_tower,
                                export_versions=export_versions(cfg.onnx), model_id=model_id,
                                embedding_dim=embedding_dim, base_model=cfg.base_model, license=cfg.license,
                                onnx=onnx)

    print(f"Exporting the {words} of {run_dir} ({src})")
    if cfg.dry_run or out is None:
        with tempfile.TemporaryDirectory(prefix="rag-capg-export-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            build_folder(src, folder, card, cfg)
            if cfg.dry_run:
                where = f"into {out}" if out else "nowhere (no --out)"
                if cfg.push_to_hub:
                    where = f"to the Hub repository {cfg.push_to_hub}" + (
                        f" (branch {cfg.revision})" if cfg.revision else "") + (
                        " as a pull request" if cfg.create_pr else "")
                print_listing(folder, f"dry run: would write {where}; nothing written, nothing uploaded:")
                return 0
            print(f"Uploaded: {push_folder(folder, cfg, token)}")
            return 0
    with atomic_dir(out) as tmp:
        build_folder(src, tmp, card, cfg)
    print_listing(out, f"Wrote {out}:")
    if cfg.push_to_hub:
        print(f"Uploaded: {push_folder(out, cfg, token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
