"""Generate the hook reference of ``docs/plugin_hooks.md`` from the hookspec docstrings.

``python -m mercure.hookdoc docs/plugin_hooks.md`` rewrites the part of the page between the
markers below; a test fails when the page and the docstrings differ, so the two cannot drift.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from mercure import PROJECT_NAME, hookspecs

BEGIN = "<!-- hook reference: generated from core/src/mercure/hookspecs.py -->"
END = "<!-- end of hook reference -->"


def _markdown(docstring: str) -> str:
    """reStructuredText literals (````x````) as Markdown code (```x```)."""
    return re.sub(r"``(.+?)``", r"`\1`", inspect.cleandoc(docstring))


def hook_functions() -> list[tuple[str, list[str], str]]:
    """Every hookspec in source order: name, argument names, docstring."""
    found = []
    for name, fn in vars(hookspecs).items():
        if inspect.isfunction(fn) and hasattr(fn, f"{PROJECT_NAME}_spec"):
            args = list(inspect.signature(fn).parameters)
            found.append((name, args, fn.__doc__ or ""))
    return found


def render_reference() -> str:
    parts = [BEGIN, ""]
    for name, args, doc in hook_functions():
        parts += [f"## {name}({', '.join(args)})", "", _markdown(doc), ""]
    parts.append(END)
    return "\n".join(parts)


def update(page: Path) -> bool:
    """Rewrite the generated part of ``page``; True if it changed."""
    text = page.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + render_reference() + text[end:]
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


def generated_part(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    return text[text.index(BEGIN) : text.index(END) + len(END)]


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/plugin_hooks.md")
    print(f"{target}: {'updated' if update(target) else 'already up to date'}")
