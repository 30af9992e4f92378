"""The runner template: runs, exit codes, logs, cancel, and picking a run up again."""

from __future__ import annotations

import sys
from pathlib import Path

import mercure_runner_template as plugin
import pytest
from mercure.config import ConfigError, Module, validate_config
from mercure.lifecycle import PluginContext
from mercure.plugins import PluginManager
from mercure.runners import ProcessingRun, RunnerError
from mercure_runner_template import TemplateRunner, TemplateRunnerSettings

MODULE = """
import os, pathlib, sys, time
out = pathlib.Path(os.environ["MERCURE_OUT_DIR"])
(out / "result.json").write_text('{"in": "%s"}' % os.environ["MERCURE_IN_DIR"])
print("module says hello")
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


def runner(tmp_path: Path, sleep: float = 0.0, code: int = 0) -> TemplateRunner:
    script = tmp_path / "module.py"
    script.write_text(MODULE)
    settings = TemplateRunnerSettings(
        commands={"m": [sys.executable, str(script), str(sleep), str(code)]}
    )
    return TemplateRunner("template", settings, PluginContext("runner", "template"))


def prepared(tmp_path: Path, module: str = "m") -> ProcessingRun:
    job = tmp_path / "job"
    (job / "in").mkdir(parents=True)
    (job / "out").mkdir()
    return ProcessingRun("t-1", module, Module(), job / "in", job / "out", {})


def test_a_run_reports_exit_code_log_and_output(tmp_path: Path) -> None:
    run = prepared(tmp_path)
    r = runner(tmp_path, code=3)
    outcome = r.wait(r.launch(run), timeout=30)
    assert outcome is not None
    assert (outcome.exit_code, outcome.error) == (3, None)
    assert "module says hello" in outcome.log
    assert (run.output_folder / "result.json").read_text() == f'{{"in": "{run.input_folder}"}}'


def test_another_runner_picks_up_a_run_by_its_handle(tmp_path: Path) -> None:
    run = prepared(tmp_path)
    handle = runner(tmp_path, sleep=1.0).launch(run)
    later = runner(tmp_path)  # as a processor restarted while the module ran
    assert later.wait(handle, timeout=0.1) is None
    outcome = later.wait(handle, timeout=30)
    assert outcome is not None and outcome.succeeded


def test_launch_is_idempotent_per_run(tmp_path: Path) -> None:
    run = prepared(tmp_path)
    r = runner(tmp_path, sleep=0.5)
    first = r.launch(run)
    assert r.launch(run) == first  # a processor that died before recording the handle
    outcome = r.wait(first, timeout=30)
    assert outcome is not None and outcome.succeeded
    assert (Path(first) / "log").read_text().count("module says hello") == 1


def test_cancel_stops_the_run(tmp_path: Path) -> None:
    run = prepared(tmp_path)
    r = runner(tmp_path, sleep=60)
    handle = r.launch(run)
    r.cancel(handle)
    outcome = r.wait(handle, timeout=10)
    assert outcome is not None and outcome.error == "cancelled" and outcome.exit_code is None


def test_unknown_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match="no command for module 'other'"):
        runner(tmp_path).launch(prepared(tmp_path, "other"))


def test_modules_without_a_command_fail_the_configuration(
    plugin_manager: PluginManager, register_plugin
) -> None:
    register_plugin(plugin, "runner_template")
    data = {
        "process_runner": "template",
        "modules": {"ai": {"docker_tag": "x/ai"}},
        "plugins": {"runners": {"template": {"commands": {"other": ["/bin/true"]}}}},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data, plugin_manager.registry)
    assert "no command for module 'ai'" in dict(info.value.errors)["modules.ai"]
