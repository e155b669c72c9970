import json

import pytest

from rag_capg.io import atomic_dir, atomic_path, write_json


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind


def test_write_json_round_trip(tmp_path):
    write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": 1}


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w.bin").write_text("v2")
            raise RuntimeError
    assert (target / "w.bin").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("v3")
    assert (target / "w.bin").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_run_logs_drop_a_torn_last_line_and_name_a_bad_one(tmp_path):
    from rag_capg.errors import InputError
    from rag_capg.io import read_log_rows

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-line
    assert [r["step"] for r in read_log_rows(log)] == [1, 2]
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:2: not JSON"):
        read_log_rows(log)
    log.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(InputError, match="step"):
        read_log_rows(log)
    assert read_log_rows(tmp_path / "absent.jsonl") == []
