"""eval/gpu_smoke.py keeps working without a GPU: its CPU mode (tiny models, bf16 autocast) end to end, and its
per-phase timer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import load_eval_script

ROOT = Path(__file__).resolve().parent.parent


def test_phase_times_are_exclusive_of_nested_phases():
    smoke = load_eval_script("gpu_smoke")
    phases = smoke.Phases(cuda=False)
    box = type("Box", (), {})()
    box.inner = lambda: time.sleep(0.10)
    box.outer = lambda: (time.sleep(0.05), box.inner(), time.sleep(0.05))
    phases.wrap(box, "inner", "judge")
    phases.wrap(box, "outer", "loss")
    box.outer()
    assert phases.calls == {"judge": 1, "loss": 1}
    assert 0.10 <= phases.time["judge"] < 0.15 and 0.10 <= phases.time["loss"] < 0.15


def test_the_smoke_test_passes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "eval/gpu_smoke.py", "--device", "cpu", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["device"] == "cpu" and all(c["ok"] for c in report["checks"]) and len(report["checks"]) >= 15
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"ce_both_towers", "resume", "llm_capg_exact", "llm_fp32_top1"}
    assert runs["resume"]["steps"] == report["steps"] // 2
    for phase in ("encode", "judge", "loss", "backward", "optimizer"):  # every phase was timed in the first run
        assert runs["ce_both_towers"]["time"][phase] > 0 and runs["ce_both_towers"]["calls"][phase] > 0
    assert "PASS: " in proc.stdout and time.time() - t0 < 120
