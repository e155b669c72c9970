"""Checkpoints: written atomically (a kill leaves either no step-N or a complete one) and resumed exactly.

A checkpoint is the model folder, the optimizer / scheduler / grad-scaler state and the step counter:
the trainer's data order and all of its sampling noise are functions of (seed, step), so nothing else
has to be stored for a resumed run to continue bit for bit.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rag_capg.errors import InputError
from rag_capg.io import atomic_dir, write_json


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- checkpoints
def find_last_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1])) if ckpts else None


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, accelerator, state: dict, *,
                    limit: int | None) -> None:
    """checkpoints/step-N/: the SentenceTransformer folder + trainer_state.pt (optimizer, scheduler, RNG,
    step; the data order and all sampling noise are functions of the step). Written to a temporary folder
    and renamed, so a kill leaves either no step-N or a complete one."""
    if accelerator.is_main_process:
        with atomic_dir(out / "checkpoints" / f"step-{step}") as tmp:
            model.save(str(tmp))
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state(),
                                # this process's device only: a resume on a box with another GPU count
                                # restores it too (the trainer's sampling noise has its own generators)
                                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                       tmp / "trainer_state.pt")
        if limit is not None:
            ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore ``path`` into the live objects; returns the rest of trainer_state.pt (step, best, ...)."""
    from sentence_transformers import SentenceTransformer

    try:
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
            raise ValueError("not a rag-capg trainer state")
    except Exception as err:  # truncated, overwritten: checkpoints are written atomically, so not by a kill
        raise _damaged(path / "trainer_state.pt", err) from None
    if state.get("trainable") is not None:  # LoRA: the folder is merged; the updates themselves resume
        params = dict(model.named_parameters())
        if set(state["trainable"]) - set(params):
            raise InputError("checkpoint does not match the model (its trainable weights are not this model's); "
                             "was it written with another mode or lora_r?", file=path, field="resume")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
    else:
        try:
            saved = SentenceTransformer(str(path), device="cpu").state_dict()
        except Exception as err:  # a damaged or hand-edited model folder: name it, no traceback
            raise _damaged(path, err) from None
        missing = model.load_state_dict(saved, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise InputError(f"checkpoint does not match the model (missing {missing.missing_keys[:3]}, "
                             f"unexpected {missing.unexpected_keys[:3]}); was it written with another mode?",
                             file=path, field="resume")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        cuda = rng["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, list) else cuda)  # lists: older checkpoints
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state


def _damaged(path: Path, err: Exception) -> InputError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    folder = path if path.is_dir() else path.parent
    return InputError(f"damaged checkpoint ({type(err).__name__}: {reason}); delete {folder} and resume=true "
                      "continues from the checkpoint before it", file=path, field="resume")


def save_best(out: Path, model, best: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with atomic_dir(out / "best") as tmp:
            model.save(str(tmp))
        write_json(out / "best.json", best)
    accelerator.wait_for_everyone()


