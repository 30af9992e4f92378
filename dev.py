#!/usr/bin/env python3
"""Set up the workspace, then start the router or run the whole test suite.

    python3 dev.py run [options of `mercure run`]   set up, then start the router
    python3 dev.py test [options of pytest]         set up, then lint, type-check and test
    python3 dev.py alone FOLDER [options of pytest] set up, then test one plugin on its own
    python3 dev.py setup                            only set up

Testing runs ruff, ruff format --check and mypy over everything, pytest over the core and the
cross-package tests in ``.venv``, and then each plugin's and template's own tests in an
environment of its own (``.venvs/<distribution>``) holding only the core, that plugin and its
``test`` extra: a dependency missing from a plugin's ``pyproject.toml`` fails there. Set
``MERCURE_TEST_PLUGINS=`` (empty) to skip that step, or to a comma-separated list of folders
(``plugins/targets/dicom``) to run only those.

Standard library only, so that it works on a machine that has nothing but Python 3.11+.
Setting up means: create ``.venv`` (``python3 -m venv``) if it is missing, install ``uv`` into
it with pip, and let ``uv sync`` install the core, every plugin of the workspace (editable) and
the development tools. Each step is printed before it runs; running it again is cheap.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PEER_INSTALL = "sudo apt-get install dcmtk orthanc orthanc-dicomweb"


def say(message: str) -> None:
    print(f"[dev.py] {message}", flush=True)


def call(cmd: list[str | Path], env: dict[str, str] | None = None) -> int:
    """Print a command, run it in the repository root, return its exit code."""
    print("$ " + shlex.join(str(part) for part in cmd), flush=True)
    return subprocess.call([str(part) for part in cmd], cwd=ROOT, env=env)


def must(cmd: list[str | Path], what: str, env: dict[str, str] | None = None) -> None:
    code = call(cmd, env)
    if code != 0:
        sys.exit(f"[dev.py] {what} failed (exit code {code}); see the output above.")


def uv_env() -> dict[str, str]:
    """uv must use this workspace's .venv, whatever environment the caller has activated."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PROJECT_ENVIRONMENT"] = str(VENV)
    return env


def setup() -> None:
    """Create .venv, put uv into it, and sync the workspace (core, plugins, dev tools)."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
        sys.exit(f"[dev.py] Python 3.11 or newer is needed; this is {sys.version.split()[0]}.")
    python = BIN / "python"
    if not python.exists():
        say(f"creating the virtual environment {VENV}")
        if call([sys.executable, "-m", "venv", VENV]) != 0:
            shutil.rmtree(VENV, ignore_errors=True)  # ours, and half made: start clean next time
            sys.exit(
                "[dev.py] `python3 -m venv` failed. On Debian or Ubuntu install the venv module "
                "first (sudo apt-get install python3-venv), then run this command again."
            )
    uv = BIN / "uv"
    if not uv.exists():
        say("installing uv into .venv with pip")
        pip_ok = subprocess.call(
            [python, "-m", "pip", "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if pip_ok != 0:  # a venv made by uv itself has no pip
            must([python, "-m", "ensurepip", "--upgrade"], "installing pip into .venv")
        must([python, "-m", "pip", "install", "--quiet", "uv"], "installing uv")
    say("installing the core, every plugin (editable) and the dev tools with uv")
    # --inexact: keep tools a developer installed into .venv by hand; CI starts from a clean one.
    must(
        [uv, "sync", "--all-packages", "--all-extras", "--group", "dev", "--inexact"],
        "uv sync",
        env=uv_env(),
    )


def peers_hint() -> None:
    """Say whether the tests that talk to real DICOM peers will run or be skipped."""
    missing = [
        name
        for name, path in (("DCMTK", "/usr/bin/storescp"), ("Orthanc", "/usr/sbin/Orthanc"))
        if not Path(path).exists()
    ]
    if missing:
        say(
            f"{' and '.join(missing)} not found: tests that talk to them are skipped. "
            f"`{PEER_INSTALL}` enables them."
        )
    else:
        say("DCMTK and Orthanc found: the tests that talk to them run too.")


def mypy_targets() -> list[str]:
    """The source folders of the core and of every plugin."""
    folders = [ROOT / "core" / "src", *(p / "src" for p in plugin_folders())]
    return [str(f.relative_to(ROOT)) for f in folders if f.is_dir()]


def plugin_folders() -> list[Path]:
    """Every plugin (``plugins/<kind>/<name>``) and template (``templates/<kind>``) folder."""
    found = [*ROOT.glob("plugins/*/*/pyproject.toml"), *ROOT.glob("templates/*/pyproject.toml")]
    return sorted(p.parent for p in found)


# Test tools every isolated plugin environment gets; a plugin lists the rest in its `test` extra.
ISOLATED_TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3"]


def test_plugin_alone(folder: Path, pytest_args: list[str]) -> int:
    """Install the core and one plugin (with its `test` extra) in a fresh venv; run its tests."""
    rel = folder.relative_to(ROOT)
    env_dir = ROOT / ".venvs" / str(rel).replace("/", "-")
    shutil.rmtree(env_dir, ignore_errors=True)  # fresh every time: nothing left from before
    env = uv_env()
    env.pop("UV_PROJECT_ENVIRONMENT", None)
    if call([BIN / "uv", "venv", "--quiet", "--python", BIN / "python", env_dir], env) != 0:
        return 1
    extra = "[test]" if "test =" in (folder / "pyproject.toml").read_text() else ""
    install = [
        BIN / "uv", "pip", "install", "--quiet", "--python", env_dir / "bin" / "python",
        "-e", ROOT / "core", "-e", f"{folder}{extra}", *ISOLATED_TEST_TOOLS,
    ]  # fmt: skip
    if call(install, env) != 0:
        return 1
    tests = folder / "tests"
    if not tests.is_dir():
        say(f"{rel} has no tests folder")
        return 1
    run_env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    run_env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{run_env.get('PATH', '')}"
    return call([env_dir / "bin" / "python", "-m", "pytest", tests, *pytest_args], run_env)


def selected_plugins() -> list[Path]:
    wanted = os.environ.get("MERCURE_TEST_PLUGINS")
    folders = plugin_folders()
    if wanted is None:
        return folders
    names = {w.strip().rstrip("/") for w in wanted.split(",") if w.strip()}
    return [f for f in folders if str(f.relative_to(ROOT)) in names]


def test(pytest_args: list[str]) -> int:
    """Lint, type-check and run pytest; every step runs, any failure fails the whole."""
    setup()
    peers_hint()
    steps: list[tuple[str, list[str | Path]]] = [
        ("ruff check", [BIN / "ruff", "check", "."]),
        ("ruff format --check", [BIN / "ruff", "format", "--check", "."]),
        ("mypy", [BIN / "mypy", *mypy_targets()]),
        ("pytest", [BIN / "pytest", *pytest_args]),
    ]
    results = []
    for name, cmd in steps:
        say(f"step: {name}")
        results.append((name, call(cmd)))
    for folder in selected_plugins():
        name = f"alone: {folder.relative_to(ROOT)}"
        say(f"step: {name} (the core, this plugin and its test extra in a fresh venv)")
        results.append((name, test_plugin_alone(folder, pytest_args)))
    print(flush=True)
    for name, code in results:
        outcome = "ok" if code == 0 else f"FAILED (exit code {code})"
        say(f"{name:<36} {outcome}")
    failed = [name for name, code in results if code != 0]
    if failed:
        say(f"failed: {', '.join(failed)}")
        return 1
    say("all checks passed")
    return 0


def run(mercure_args: list[str]) -> None:
    setup()
    say(
        "starting `mercure run` (Ctrl-C stops it). Without --config, ./mercure.json or "
        "$MERCURE_CONFIG it uses the built-in default: DICOM on port 11112, every series "
        "copied to ./mercure-data/target/<task id>/."
    )
    exe = BIN / "mercure"
    sys.stdout.flush()
    os.execv(exe, [str(exe), "run", *mercure_args])


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        run(rest)
    elif command == "test":
        return test(rest)
    elif command == "alone":
        if not rest:
            print("usage: python3 dev.py alone plugins/<kind>/<name> [pytest options]")
            return 2
        setup()
        return test_plugin_alone((ROOT / rest[0]).resolve(), rest[1:])
    elif command == "setup":
        setup()
    else:
        print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
