"""The ``detect`` command's own behaviour (subcommands have their own test files)."""

from __future__ import annotations

import subprocess
import sys

from detect import cli


def test_closed_output_pipe_is_not_a_traceback() -> None:
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    run = subprocess.run(
        [sys.executable, "-m", "detect", "info"], stdout=reader.stdin, stderr=subprocess.PIPE, timeout=120, text=True
    )
    reader.stdin.close()
    reader.wait(timeout=30)
    assert "Traceback" not in run.stderr
    assert run.returncode == 0


def test_usage_errors_exit_2(capsys) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert cli.main(["bench", "no-such-benchmark"]) == 2
    assert "unknown_benchmark" in capsys.readouterr().err


def test_default_proposal_workers_leave_small_machines_in_process() -> None:
    from detect.engines.local import default_proposal_workers

    assert [default_proposal_workers(c) for c in (1, 2, 3, 4, 8, 16)] == [0, 0, 2, 3, 4, 4]


def _imported_modules(*args: str) -> set[str]:
    """Every module ``python -X importtime -m detect ARGS`` imports (read from its import-time report)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "detect", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:") and "|" in line}


def test_version_and_help_import_no_command_module() -> None:
    """``detect --version`` and ``--help`` stay fast by importing neither torch nor the web stack nor any command."""
    for args in (["--version"], ["--help"]):
        modules = _imported_modules(*args)
        assert "detect.cli" in modules, args  # the report is read right
        heavy = {m for m in modules if m.split(".")[0] in ("torch", "torchvision", "fastapi", "numpy", "PIL")}
        commands = {m for m in modules if m.startswith("detect.cli.") and m != "detect.cli.args"}
        assert not heavy and not commands, (args, sorted(heavy), sorted(commands))


def test_command_table_matches_the_command_modules() -> None:
    """Every command a module registers is in ``cli.COMMANDS`` under that module, and the other way round."""
    import argparse
    import importlib

    for module in {m for m, _ in cli.COMMANDS.values() if m is not None}:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(f"detect.cli.{module}").add_parser(sub)
        assert set(sub.choices) == {name for name, (m, _) in cli.COMMANDS.items() if m == module}, module
    full = cli.build_parser()
    assert set(full._subparsers._group_actions[0].choices) == set(cli.COMMANDS)


def test_serve_weights_serves_one_model(monkeypatch, tmp_path) -> None:
    """``detect serve --weights FILE`` serves that file alone, named by ``--model`` (default: its family), on the
    device asked for; the app it would run is inspected instead of started."""
    import uvicorn

    from detect.testing import save_random_tiny

    weights = save_random_tiny("rcnn", tmp_path / "mine.safetensors", "mine", ["a", "b"])
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config.app))
    monkeypatch.delenv("DETECT_MODELS", raising=False)
    assert cli.main(["serve", "--weights", str(weights), "--device", "cpu", "--port", "8123"]) == 0
    assert cli.main(["serve", "--weights", str(weights), "--model", "parts"]) == 0
    first, second = (app.state.service for app in started)
    assert {k: (v.family, v.weights) for k, v in first.settings.models.items()} == {"rcnn": ("rcnn", str(weights))}
    assert (first.settings.device, first.address, first.settings.default_model) == ("cpu", "http://127.0.0.1:8123", "rcnn")
    assert list(second.settings.models) == ["parts"] and second.settings.device == "auto"
    assert cli.main(["serve", "--weights", str(tmp_path / "missing.safetensors")]) == 2
