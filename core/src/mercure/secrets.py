"""Secret references for any plugin's settings: ``${env:NAME}`` and ``${file:/path}``.

A password, key or token in ``mercure.json`` may be written as a reference instead of
plaintext. The reference is resolved when the configuration loads, so a missing variable or an
unreadable file is a configuration error with its JSON path, not a failure at the first send.
Plugins declare such fields with :data:`Secret` or :data:`OptionalSecret`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

_SECRET_REF = re.compile(r"^\$\{(env|file):(.+)\}$")


def is_secret_reference(value: object) -> bool:
    """True for a string of the form ``${env:NAME}`` or ``${file:/path}``."""
    return isinstance(value, str) and _SECRET_REF.match(value.strip()) is not None


def resolve_secret(value: Any) -> Any:
    """Replace ``${env:NAME}`` / ``${file:/path}`` with the variable's or the file's content."""
    if not isinstance(value, str):
        return value
    match = _SECRET_REF.match(value.strip())
    if not match:
        return value
    source, ref = match.groups()
    if source == "env":
        if ref not in os.environ:
            raise ValueError(f"environment variable {ref} is not set (referenced as {value})")
        return os.environ[ref]
    try:
        return Path(ref).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {ref}: {exc.strerror}") from None


Secret = Annotated[str, BeforeValidator(resolve_secret)]
"""A string field that may be given as a reference to an environment variable or a file."""
OptionalSecret = Annotated[str | None, BeforeValidator(resolve_secret)]

__all__ = ["OptionalSecret", "Secret", "is_secret_reference", "resolve_secret"]
