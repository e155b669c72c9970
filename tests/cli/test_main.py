import subprocess
import sys

from rag_capg.cli import COMMANDS, main


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: rag-capg" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "rag_capg.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
