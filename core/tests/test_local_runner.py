"""The built-in ``local`` runner: real subprocesses, re-attach, cancel, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mercure.builtin.local_runner import LocalRunner, LocalRunnerSettings, module_command
from mercure.config import Module
from mercure.lifecycle import PluginContext
from mercure.runners import ProcessingRun, RunOutcome
from mercure.testing import wait_for


def runner(**settings: object) -> LocalRunner:
    return LocalRunner("local", LocalRunnerSettings(**settings), PluginContext("runner", "local"))


def prepared(
    tmp_path: Path, command: str | list[str], name: str = "m", **extra: object
) -> ProcessingRun:
    root = tmp_path / name
    for sub in ("in", "out", "run"):
        (root / sub).mkdir(parents=True)
    return ProcessingRun(
        task_id="t1",
        module_name=name,
        module=Module(command=command),
        input_folder=root / "in",
        output_folder=root / "out",
        settings={},
        run_id=f"t1-a1-s0-{name}",
        run_folder=root / "run",
        **extra,  # type: ignore[arg-type]
    )


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def wait_outcome(r: LocalRunner, handle: str, timeout: float = 30.0) -> RunOutcome:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = r.wait(handle, 1.0)
        if outcome is not None:
            return outcome
    pytest.fail(f"no outcome within {timeout} s")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead: only its parent has not collected it yet
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_runs_a_command_with_mercure_folders_and_a_clean_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    module = script(
        tmp_path,
        "env",
        """
        import json, os, sys
        out = os.environ["MERCURE_OUT_DIR"]
        keys = ["MERCURE_IN_DIR", "MERCURE_OUT_DIR", "MONAI_INPUTPATH", "HOLOSCAN_OUTPUT_PATH",
                "SECRET_TOKEN", "FROM_MODULE", "FROM_RUNNER"]
        json.dump({k: os.environ.get(k) for k in keys}, open(os.path.join(out, "env.json"), "w"))
        print("hello from the module")
        print("to stderr", file=sys.stderr)
        """,
    )
    r = runner(environment={"FROM_RUNNER": "r"})
    run = prepared(tmp_path, f"{{python}} {module}", environment={"FROM_MODULE": "m"})
    outcome = wait_outcome(r, r.launch(run))
    assert outcome.succeeded, outcome
    assert "hello from the module" in outcome.log and "to stderr" in outcome.log
    env = json.loads((run.output_folder / "env.json").read_text())
    assert env["MERCURE_IN_DIR"] == env["MONAI_INPUTPATH"] == str(run.input_folder)
    assert env["MERCURE_OUT_DIR"] == env["HOLOSCAN_OUTPUT_PATH"] == str(run.output_folder)
    assert env["SECRET_TOKEN"] is None
    assert env["FROM_MODULE"] == "m" and env["FROM_RUNNER"] == "r"


def test_exit_code_and_missing_command(tmp_path: Path) -> None:
    r = runner()
    failing = wait_outcome(r, r.launch(prepared(tmp_path, [sys.executable, "-c", "exit(3)"])))
    assert failing.exit_code == 3 and failing.error is None and not failing.succeeded
    missing = wait_outcome(r, r.launch(prepared(tmp_path, "/nonexistent/module", name="x")))
    assert missing.exit_code is None
    assert missing.error is not None and "/nonexistent/module" in missing.error


def test_entry_point_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "ep_module.py").write_text(
        "import os, pathlib\n"
        "def main():\n"
        "    pathlib.Path(os.environ['MERCURE_OUT_DIR'], 'ran').write_text('yes')\n"
        "    return 4\n"
    )
    r = runner(environment={"PYTHONPATH": str(package)})
    run = prepared(tmp_path, "ep_module:main")
    assert module_command(run.module)[0] == sys.executable
    outcome = wait_outcome(r, r.launch(run))
    assert outcome.exit_code == 4, outcome.log
    assert (run.output_folder / "ran").read_text() == "yes"


def test_a_new_runner_instance_reattaches_and_launch_never_runs_twice(tmp_path: Path) -> None:
    counter = tmp_path / "runs.txt"
    module = script(
        tmp_path,
        "slow",
        f"""
        import os, time
        with open({str(counter)!r}, "a") as fh:
            fh.write("run\\n")
        time.sleep(1.5)
        """,
    )
    run = prepared(tmp_path, f"{{python}} {module}")
    first = runner()
    handle = first.launch(run)
    # The processor died before it persisted the handle: the next one launches again.
    again = runner().launch(run)
    assert again == handle
    # A processor restarted while the module runs follows the same run to its end.
    outcome = wait_outcome(runner(), handle)
    assert outcome.succeeded
    assert counter.read_text() == "run\n"
    assert runner().launch(run) == handle  # even after it ended: not started again
    time.sleep(0.3)
    assert counter.read_text() == "run\n"
    first.cleanup(handle)
    assert not run.run_folder.exists()  # type: ignore[union-attr]


def test_cancel_kills_the_module_and_everything_it_started(tmp_path: Path) -> None:
    pids = tmp_path / "pids.txt"
    module = script(
        tmp_path,
        "hang",
        f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a module that ignores SIGTERM
        child = subprocess.Popen(["sleep", "300"])
        escaped = subprocess.Popen(["sleep", "301"], start_new_session=True)
        with open({str(pids)!r}, "w") as fh:
            fh.write(f"{{os.getpid()}} {{child.pid}} {{escaped.pid}}")
        time.sleep(300)
        """,
    )
    r = runner(kill_grace=0.5)
    handle = r.launch(prepared(tmp_path, f"{{python}} {module}"))
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3, timeout=20)
    started = [int(p) for p in pids.read_text().split()]
    assert all(alive(p) for p in started)
    assert r.wait(handle, 0.2) is None
    r.cancel(handle)
    outcome = wait_outcome(r, handle)
    assert outcome.exit_code is None
    assert outcome.error is not None and outcome.error.startswith("cancelled")
    wait_for(lambda: not any(alive(p) for p in started), timeout=10, what="no process left")


def test_processes_left_behind_by_a_finished_module_are_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids.txt"
    module = script(
        tmp_path,
        "daemon",
        f"""
        import subprocess
        left = subprocess.Popen(["sleep", "300"], start_new_session=True)
        open({str(pids)!r}, "w").write(str(left.pid))
        """,
    )
    r = runner()
    outcome = wait_outcome(r, r.launch(prepared(tmp_path, f"{{python}} {module}")))
    assert outcome.succeeded
    wait_for(lambda: not alive(int(pids.read_text())), timeout=10, what="leftover killed")


def test_a_killed_wrapper_takes_its_module_with_it(tmp_path: Path) -> None:
    pids = tmp_path / "pid.txt"
    module = script(
        tmp_path,
        "victim",
        f"""
        import os, time
        open({str(pids)!r}, "w").write(str(os.getpid()))
        time.sleep(300)
        """,
    )
    r = runner()
    run = prepared(tmp_path, f"{{python}} {module}")
    handle = r.launch(run)
    wait_for(pids.exists, timeout=20)
    begun = json.loads((run.run_folder / "begun.json").read_text())  # type: ignore[operator]
    os.kill(begun["wrapper_pid"], signal.SIGKILL)
    outcome = wait_outcome(r, handle)
    assert outcome.exit_code is None and outcome.error is not None
    assert "ended without recording" in outcome.error
    wait_for(lambda: not alive(int(pids.read_text())), timeout=10, what="module killed")
    # A later launch of the same run does not start the module again.
    assert runner().launch(run) == handle
    final = wait_outcome(runner(), handle)
    assert final.exit_code is None and final.error is not None


def test_check_module_reports_missing_and_bad_commands() -> None:
    assert LocalRunner.check_module(None, "ok", Module(command="/bin/true")) == []
    errors = dict(LocalRunner.check_module(None, "ai", Module(docker_tag="x/ai:1")))
    assert "no command" in errors["command"] and "mercure-runner-docker" in errors["command"]
    errors = dict(LocalRunner.check_module(None, "q", Module(command="echo 'unbalanced")))
    assert "cannot be split" in errors["command"]
