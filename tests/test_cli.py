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
