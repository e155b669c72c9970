"""A run folder belongs to one run: the promises CAPGTrainer keeps about ``output_dir``, in one place.

1. **One run at a time.** The main process holds an exclusive lock (``flock`` on ``output_dir/.lock``, which
   records its pid and host) from the trainer's construction to the end of ``train()``; a second run started
   on the same folder stops at once, naming the holder. The kernel drops the lock when the process dies
   (SIGKILL included), so a killed run never blocks its own ``resume=true``.
2. **A used folder is never mixed.** Without ``resume=true`` a folder that holds anything of a run
   (config.yaml, logs, checkpoints, final/, best/) is refused, not overwritten and not merged: pass
   ``resume=true``, another ``output_dir``, or delete it. Nothing is ever deleted for you.
3. **Resume means the same run.** ``resume=true`` continues only with the options that define the run
   (everything in config.yaml but ``MAY_CHANGE_ON_RESUME``: the data, model, judge, estimator, seed, batch,
   schedule including max_steps / epochs, ...); any difference is one refusal naming every differing option
   with both values. A folder killed before its first checkpoint restarts from step 0 (its stale best/ is
   removed, as the same run will write it again); a finished run without checkpoints has nothing to resume.
4. **Checked before any expensive work.** ``output_dir`` and ``cache_dir`` must be writable and the lock
   free before a model is loaded or a passage encoded.
5. **Leftovers are swept.** A kill during an atomic write leaves a hidden ``.step-N.<random>`` or
   ``.final.old``; they are removed under the lock, where nothing else can be writing them.
6. **A run says when it learned nothing.** Steps in which the judge failed on every query
   (``lsr_on_error=skip_query``) carry no gradient; ``trained_steps_with_signal`` in run_summary.json counts
   the others, and a run with none ends with a one-line warning: its final/ is the initial model.

Under several processes the main process does the file work and every process raises the same InputError.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rag_capg.errors import InputError
from rag_capg.io import check_writable, orphaned_temporaries

# Options that may differ when a run is resumed: where things go, how often to log, evaluate or checkpoint,
# and how to treat the judge operationally. Everything else in config.yaml defines the run (new options too,
# unless they are added here).
MAY_CHANGE_ON_RESUME = frozenset({
    "output_dir", "resume", "progress", "report_to", "log_every", "save_every", "save_total_limit", "eval_every",
    "eval_before", "cache_dir", "encode_batch_size", "lsr_batch_size", "lsr_on_error", "lsr_timeout"})
# What a run writes into its folder; any of them makes the folder "used".
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "metrics.csv", "eval.jsonl", "run_summary.json", "curves.png",
                 "best.json", "best", "final", "checkpoints", "tensorboard", "dev_qrels.json",
                 "dev_per_query.json")
LOCK_NAME = ".lock"

_HELD: dict[str, "_Lock"] = {}  # locks this process holds, by resolved folder


class _Lock:
    """An exclusive flock on ``folder/.lock``. Released (file removed) by release(), at interpreter exit, or
    by the kernel when the process dies. The file is unlinked while still locked and a fresh lock checks that
    it locked the file now at the path, so two processes can never both believe they hold it."""

    def __init__(self, folder: Path, *, remove_folder_if_empty: bool = False):
        self.path = folder / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _try_lock(fd)
            except OSError:
                os.close(fd)
                raise InputError(f"output_dir is in use by another run ({_holder(self.path)}); wait for it to "
                                 "finish or choose another output_dir", file=folder, field="output_dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its previous holder had just removed: try again
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        self._finalizer = weakref.finalize(self, _unlock, self.path, fd, remove_folder_if_empty)

    def release(self) -> None:
        self._finalizer()


def _try_lock(fd: int) -> None:
    """An exclusive, non-blocking lock on the open file ``fd``; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(path: Path, fd: int, remove_folder_if_empty: bool) -> None:
    try:
        os.unlink(path)  # while still held: a process that opened the old file will see it is gone
    except OSError:
        pass
    os.close(fd)
    if remove_folder_if_empty:  # a run that stopped before writing anything leaves no empty folder behind
        try:
            path.parent.rmdir()
        except OSError:
            pass


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that holds its .lock"


def _comparable(config: dict) -> dict:
    """The config as config.yaml stores it (a YAML round trip: tuples become lists, floats print the same)."""
    import yaml

    return yaml.safe_load(yaml.safe_dump(config, sort_keys=False)) or {}


def differing_options(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every run-defining option both configs hold and that differs."""
    saved, current = _comparable(saved), _comparable(current)
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != current[k]]


class RunFolder:
    """The trainer's hold on ``args.output_dir`` (see the module docstring). Create it with ``open`` before
    anything expensive; ``check_same_run`` once the full config is known; ``close`` at the end of the run."""

    def __init__(self, out: Path, accelerator, lock: _Lock | None):
        self.out, self.accelerator, self.lock = out, accelerator, lock
        self.steps_with_signal = self.skipped_queries = 0

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, args, accelerator, script_args: dict | None = None) -> "RunFolder":
        """Check both folders are writable, take the lock and decide fresh start / resume / refusal, comparing
        the options known before any model is loaded (``args``: a CAPGConfig; ``script_args``: the command
        line's data and judge options)."""
        out = Path(args.output_dir)
        current = {**(script_args or {}), **asdict(args)}

        def work():
            check_writable(args.cache_dir, field="cache_dir")
            created = not out.exists()
            check_writable(out, field="output_dir")
            key = str(out.resolve())
            # A lock this process already holds: an earlier trainer on this folder that failed before it
            # finished (a notebook). Processes are what the lock keeps apart; it passes to the new trainer.
            lock = _HELD.get(key) or _Lock(out, remove_folder_if_empty=created)
            _HELD[key] = lock
            folder = cls(out, accelerator, lock)
            try:
                folder._admit(args.resume, current)
            except InputError:
                folder.close()
                raise
            return folder

        folder = _on_main(accelerator, work)
        return folder if folder is not None else cls(out, accelerator, None)

    def _admit(self, resume: bool, current: dict) -> None:
        out = self.out
        used = [name for name in RUN_ARTEFACTS if (out / name).exists()
                and not ((out / name).is_dir() and not any((out / name).iterdir()))]
        ckpts = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()]
        if used and not resume:
            raise InputError(f"already holds a run ({', '.join(used[:5])}): pass resume=true to continue it, or "
                             "choose another output_dir (or delete this one); a run folder holds one run",
                             file=out, field="output_dir")
        if used and resume:
            self._check_same_run(current)
            if not ckpts and (out / "final").is_dir():
                raise InputError("holds a finished run without checkpoints (save_every=0): there is nothing to "
                                 f"resume. To train further, start a new run from its model (model={out / 'final'})",
                                 file=out, field="resume")
            if not ckpts:  # killed before its first checkpoint: the same run restarts at step 0
                shutil.rmtree(out / "best", ignore_errors=True)
                (out / "best.json").unlink(missing_ok=True)
        for stale in orphaned_temporaries(out, RUN_ARTEFACTS) + orphaned_temporaries(out / "checkpoints", ("step-",)):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def check_same_run(self, current: dict) -> None:
        """Refuse to continue the run recorded in config.yaml with other run-defining options (the trainer
        calls it with its full run_config(), once the model, data and judge are known)."""
        _on_main(self.accelerator, lambda: self._check_same_run(current))

    def _check_same_run(self, current: dict) -> None:
        saved_path = self.out / "config.yaml"
        if not saved_path.is_file():
            return
        import yaml

        try:
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise InputError(f"unreadable ({type(err).__name__}); cannot tell which run this folder holds",
                             file=saved_path) from None
        diff = differing_options(saved, current)
        if diff:
            raise InputError("resume=true continues the run this folder holds, but these options differ from "
                             f"its config.yaml: {'; '.join(diff)}. Resume with the same values, or start a new "
                             "run in another output_dir", file=self.out, field="resume")

    # ------------------------------------------------------------------------------------------ the run
    def note_step(self, row: dict, batch_size: int) -> None:
        """Count one optimizer step: it carried a gradient unless the judge failed on all its queries."""
        skipped = int(row.get("skipped_queries") or 0)
        self.skipped_queries += skipped
        self.steps_with_signal += skipped < batch_size

    def state(self) -> dict:
        """What a checkpoint keeps of the counters (restored by ``restore``)."""
        return {"steps_with_signal": self.steps_with_signal, "skipped_queries_total": self.skipped_queries}

    def restore(self, state: dict) -> None:
        self.steps_with_signal = int(state.get("steps_with_signal", state.get("step", 0)))
        self.skipped_queries = int(state.get("skipped_queries_total", 0))

    def summary(self, steps: int) -> dict:
        """run_summary.json's account of the signal; prints one warning line when no step had any."""
        if steps > 0 and self.steps_with_signal == 0 and self.accelerator.is_main_process:
            print(f"rag-capg: warning: the judge failed on every query of all {steps} steps "
                  f"({self.skipped_queries} queries skipped, lsr_on_error=skip_query): nothing was learnt and "
                  f"{self.out / 'final'} is the initial model", file=sys.stderr, flush=True)
        return {"trained_steps_with_signal": self.steps_with_signal,
                "steps_without_signal": steps - self.steps_with_signal, "skipped_queries": self.skipped_queries}

    def close(self) -> None:
        """Release the lock (the folder is free for the next run)."""
        if self.lock is not None:
            _HELD.pop(str(self.out.resolve()), None)
            self.lock.release()
            self.lock = None


def _on_main(accelerator, fn) -> Any:
    """``fn()`` on the main process; an InputError there is raised on every process (none waits forever)."""
    if accelerator is None or accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    result, message = None, [None]
    if accelerator.is_main_process:
        try:
            result = fn()
        except InputError as err:
            message[0] = str(err)
            broadcast_object_list(message)
            raise
    broadcast_object_list(message)
    if message[0] is not None:
        raise InputError(message[0])
    return result
