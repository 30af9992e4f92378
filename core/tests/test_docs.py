"""The documentation stays true to the code.

* every hookspec is documented in ``docs/plugin_hooks.md`` under a heading ``name(args)`` with
  its real arguments, and the page documents no hook that does not exist;
* every plugin example in the docs imports and registers as a plugin;
* ``docs/configuration.md`` has a row for every field of the configuration models, and no row
  for a field that does not exist;
* every ``mercure ...`` command shown in the README and the docs exists.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from mercure import PROJECT_NAME, config, hookspecs, targets
from mercure.plugins import PluginManager
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HOOK_HEADING = re.compile(r"^#{2,3} +`?([A-Za-z_]\w*)\(([^)]*)\)`? *$", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def specs() -> dict[str, list[str]]:
    """Hook name -> argument names, for every function pluggy marked as a hookspec."""
    found = {
        name: list(inspect.signature(fn).parameters)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, f"{PROJECT_NAME}_spec")
    }
    assert found, "no hookspecs found in mercure.hookspecs: has the marker changed?"
    return found


def documented_hooks() -> dict[str, list[str]]:
    text = (DOCS / "plugin_hooks.md").read_text()
    return {
        m.group(1): [a.strip() for a in m.group(2).split(",") if a.strip()]
        for m in HOOK_HEADING.finditer(text)
    }


def test_hook_reference_is_generated_from_the_hookspecs() -> None:
    """The page's reference is the hookspec docstrings: they cannot drift apart."""
    from mercure.hookdoc import generated_part, render_reference

    assert generated_part(DOCS / "plugin_hooks.md") == render_reference(), (
        "docs/plugin_hooks.md differs from the hookspec docstrings: run "
        "`python -m mercure.hookdoc docs/plugin_hooks.md`"
    )


def test_every_hookspec_says_who_calls_it_and_what_errors_do() -> None:
    from mercure.hookdoc import hook_functions

    for name, _args, doc in hook_functions():
        for part in ("**Called**", "**Arguments**", "**Returns**", "**Exceptions**"):
            assert part in doc, f"the docstring of hookspec {name} lacks {part}"


def test_every_hook_is_documented() -> None:
    missing = sorted(set(specs()) - set(documented_hooks()))
    assert not missing, (
        f"hooks missing from docs/plugin_hooks.md (add a '## name(args)' section): {missing}"
    )


def test_no_unknown_hook_is_documented() -> None:
    unknown = sorted(set(documented_hooks()) - set(specs()))
    assert not unknown, f"docs/plugin_hooks.md documents hooks that do not exist: {unknown}"


def test_documented_arguments_match() -> None:
    documented = documented_hooks()
    for name, args in specs().items():
        if name in documented:
            assert documented[name] == args, f"{name}: documented {documented[name]}, is {args}"


def code_blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text()
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1) == language]


def plugin_examples() -> list[str]:
    """The complete plugin modules shown in the docs (those that implement a hook)."""
    pages = ("plugin_hooks.md", "writing_plugins.md")
    return [b for page in pages for b in code_blocks(page, "python") if "@hookimpl" in b]


@pytest.mark.parametrize("index", range(len(plugin_examples())))
def test_plugin_examples_work(index: int, tmp_path: Path) -> None:
    """Each example imports, registers as a plugin, and registers what it says it does."""
    source = plugin_examples()[index]
    path = tmp_path / f"plugin_example_{index}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    manager = PluginManager()
    manager.register(module, "example")
    manager.load_builtins()
    manager.check()
    for called in re.findall(r'register\("(\w+)"', source):
        assert any(t.name == called and t.plugin == "example" for t in manager.registry)
    if "def register_commands" in source:
        cli = typer.Typer()
        manager.hook.register_commands(cli=cli)
        assert cli.registered_groups or cli.registered_commands


CONFIG_MODELS: list[type[BaseModel]] = [
    config.Config,
    config.Rule,
    config.Module,
    config.DicomReceiverConfig,
    config.ReceiverTLSConfig,
    config.ProcessingLogsConfig,
    targets.TargetConfig,
]


def model_section(text: str, model: type[BaseModel]) -> str:
    """The part of the page from the heading that names ``model`` to the next heading."""
    match = re.search(rf"^#+ .*`{model.__name__}`.*$", text, re.MULTILINE)
    assert match, f"docs/configuration.md has no heading naming `{model.__name__}`"
    rest = text[match.end() :]
    end = re.search(r"^#+ ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


@pytest.mark.parametrize("model", CONFIG_MODELS, ids=lambda m: m.__name__)
def test_configuration_reference_is_complete(model: type[BaseModel]) -> None:
    section = model_section((DOCS / "configuration.md").read_text(), model)
    rows = set(re.findall(r"^\| *`(\w+)` *\|", section, re.MULTILINE))
    missing = sorted(set(model.model_fields) - rows)
    unknown = sorted(rows - set(model.model_fields))
    assert not missing, f"{model.__name__} fields not in docs/configuration.md: {missing}"
    assert not unknown, f"docs/configuration.md lists fields {model.__name__} lacks: {unknown}"


# Resolves documented command lines against the real CLI (plugins' commands included) in a
# child process, so that building the typer app does not leak into other tests.
_RESOLVE = """
import json, sys
import typer.main
from mercure.cli import _build
root = typer.main.get_command(_build())
bad = []
for words in json.loads(sys.argv[1]):
    command = root
    for word in words:
        if not hasattr(command, "commands"):
            break  # a command, not a group: the remaining words are its arguments
        if word not in command.commands:
            bad.append(" ".join(words))
            break
        command = command.commands[word]
print(json.dumps(bad))
"""


def documented_commands() -> list[list[str]]:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    commands: set[tuple[str, ...]] = set()
    for page in pages:
        for block in FENCE.finditer(page.read_text()):
            if block.group(1) not in ("bash", "console", "sh", "text"):
                continue
            for line in block.group(2).splitlines():
                match = re.search(r"(?:^|[\s/$])mercure((?: +[a-z][\w-]*)+)", line)
                if match:
                    commands.add(tuple(match.group(1).split()))
    return [list(c) for c in sorted(commands)]


def test_documented_commands_exist() -> None:
    commands = documented_commands()
    assert ["run"] in [c[:1] for c in commands], "the docs should show `mercure run`"
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], "documented commands the CLI does not have"


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python3 dev.py run" in readme
    assert "python3 dev.py test" in readme
