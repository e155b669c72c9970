"""Checkpoint state that only matters on GPUs, checked on CPU: the CUDA RNG state of this process only (a
resume on a box with another GPU count restores it), and the fp16 grad scaler's state round-trip."""

from __future__ import annotations

import types

import pytest
import torch

from rag_capg.training import checkpoints


class TinyModel(torch.nn.Linear):
    """A module with SentenceTransformer's save(folder); load_checkpoint reads it back through SentenceTransformer,
    which the tests replace by reading the saved state dict."""

    def save(self, folder: str) -> None:
        torch.save(self.state_dict(), f"{folder}/weights.pt")


@pytest.fixture
def fake_sentence_transformer(monkeypatch):
    import sentence_transformers

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer",
                        lambda folder, device=None: types.SimpleNamespace(
                            state_dict=lambda: torch.load(f"{folder}/weights.pt")))


def accelerator(scaler=None):
    return types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, scaler=scaler)


def objects():
    torch.manual_seed(0)
    model = TinyModel(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_only_this_process_cuda_rng_state_is_saved_and_any_saved_form_loads(tmp_path, monkeypatch,
                                                                           fake_sentence_transformer):
    # Pretend to be on a GPU box: the checkpoint must hold get_rng_state() (this device), never
    # get_rng_state_all() (one per visible GPU, which failed to restore with fewer GPUs).
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all") or [])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.append(state.clone()))
    model, opt, sched = objects()
    checkpoints.save_checkpoint(tmp_path, 3, model, opt, sched, accelerator(), {"step": 3}, limit=None)
    path = tmp_path / "checkpoints" / "step-3"
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    assert torch.equal(state["rng"]["cuda"], torch.full((16,), 7, dtype=torch.uint8)) and "all" not in calls
    checkpoints.load_checkpoint(path, *objects())
    assert torch.equal(calls[-1], torch.full((16,), 7, dtype=torch.uint8))
    # a checkpoint from an 8-GPU box written by the old code (one state per GPU) resumes on one GPU ...
    state["rng"]["cuda"] = [torch.full((16,), g, dtype=torch.uint8) for g in range(8)]
    torch.save(state, path / "trainer_state.pt")
    checkpoints.load_checkpoint(path, *objects())
    assert torch.equal(calls[-1], torch.zeros(16, dtype=torch.uint8))
    # ... and on a CPU box, where there is no CUDA state to restore
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    n = len(calls)
    assert checkpoints.load_checkpoint(path, *objects())["step"] == 3 and len(calls) == n


def test_the_grad_scaler_state_round_trips(tmp_path, fake_sentence_transformer):
    model, opt, sched = objects()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for bad in (False, True, False):  # one overflow halves the scale; the growth tracker counts good steps
        loss = model(torch.ones(1, 3)).sum() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    saved = scaler.state_dict()
    assert saved["scale"] == 512.0 and saved["_growth_tracker"] == 1
    checkpoints.save_checkpoint(tmp_path, 3, model, opt, sched, accelerator(scaler), {"step": 3}, limit=None)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    checkpoints.load_checkpoint(tmp_path / "checkpoints" / "step-3", *objects(), fresh)
    assert fresh.state_dict() == saved
