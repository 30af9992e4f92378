"""A module's ``resources`` and ``constraints`` (mercure's HCL snippets) as Nomad API JSON.

mercure pastes both fields into its Nomad job template: ``constraints`` at the job level
(``constraint { ... }`` and ``affinity { ... }`` blocks) and ``resources`` as the body of the
task's ``resources { ... }`` block (``cpu = 500``, ``memory = 2048``, ``device "nvidia/gpu" {
count = 1 }``). This runner registers jobs as JSON, so it parses the snippets (python-hcl2)
and maps the parts Nomad's job specification defines onto the API's field names. Anything
else is an error naming the key, reported when the configuration loads.
"""

from __future__ import annotations

import json
from typing import Any

import hcl2
from lark.exceptions import LarkError

#: HCL attribute of a ``resources`` block -> Nomad API field (all integers).
RESOURCE_FIELDS = {
    "cpu": "CPU",
    "cores": "Cores",
    "memory": "MemoryMB",
    "memory_max": "MemoryMaxMB",
    "secrets": "SecretsMB",
}
#: Constraint shorthands of Nomad's job specification: ``regexp = "..."`` is
#: ``operator = "regexp"`` with that value.
OPERATOR_SHORTHANDS = ("regexp", "version", "semver", "set_contains")
AFFINITY_SHORTHANDS = ("regexp", "version", "semver", "set_contains_any", "set_contains_all")


class HclError(ValueError):
    """A snippet that is not HCL, or that holds something the runner cannot map."""


def _parse(text: str) -> dict[str, Any]:
    try:
        data = hcl2.loads(text + "\n")
    except (LarkError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HclError(f"is not valid HCL: {first}") from None
    return _clean(data)


def _clean(value: Any) -> Any:
    """Drop python-hcl2's bookkeeping keys (``__is_block__``, ``__comments__``)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _string(value: Any, where: str) -> str:
    """An HCL string literal's value (python-hcl2 keeps the quotes of literals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = value[1:-1]
        return str(decoded)
    raise HclError(f"{where} must be a quoted string, not {value!r}")


def _label(value: str) -> str:
    return _string(value, "a block label") if value.startswith('"') else value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HclError(f"{where} must be a whole number, not {value!r}")
    if value < 0:
        raise HclError(f"{where} must not be negative")
    return value


def _blocks(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
        raise HclError(f"{name} must be written as a block: {name} {{ ... }}")
    return value


def _constraint(block: dict[str, Any], where: str) -> dict[str, str]:
    body = dict(block)
    out = {"LTarget": "", "RTarget": "", "Operand": "="}
    if "attribute" in body:
        out["LTarget"] = _string(body.pop("attribute"), f"{where}: attribute")
    if "operator" in body:
        out["Operand"] = _string(body.pop("operator"), f"{where}: operator")
    if "value" in body:
        out["RTarget"] = _string(body.pop("value"), f"{where}: value")
    for short in OPERATOR_SHORTHANDS:
        if short in body:
            out["Operand"] = short
            out["RTarget"] = _string(body.pop(short), f"{where}: {short}")
    if "distinct_hosts" in body:
        enabled = body.pop("distinct_hosts")
        if enabled is not True and enabled is not False:
            raise HclError(f"{where}: distinct_hosts must be true or false")
        if not enabled:
            return {}
        out["Operand"] = "distinct_hosts"
    if "distinct_property" in body:
        out["Operand"] = "distinct_property"
        out["LTarget"] = _string(body.pop("distinct_property"), f"{where}: distinct_property")
    if body:
        raise HclError(
            f"{where}: unknown key(s) {', '.join(sorted(body))} (a constraint has attribute, "
            f"operator, value, or one of {', '.join(OPERATOR_SHORTHANDS)}, distinct_hosts, "
            "distinct_property)"
        )
    if not out["LTarget"] and out["Operand"] not in ("distinct_hosts",):
        raise HclError(f"{where}: attribute is missing")
    return out


def _affinity(block: dict[str, Any], where: str) -> dict[str, Any]:
    body = dict(block)
    out: dict[str, Any] = {"LTarget": "", "RTarget": "", "Operand": "=", "Weight": 50}
    if "attribute" not in body:
        raise HclError(f"{where}: attribute is missing")
    out["LTarget"] = _string(body.pop("attribute"), f"{where}: attribute")
    if "operator" in body:
        out["Operand"] = _string(body.pop("operator"), f"{where}: operator")
    if "value" in body:
        out["RTarget"] = _string(body.pop("value"), f"{where}: value")
    for short in AFFINITY_SHORTHANDS:
        if short in body:
            out["Operand"] = short
            out["RTarget"] = _string(body.pop(short), f"{where}: {short}")
    if "weight" in body:
        weight = body.pop("weight")
        if isinstance(weight, bool) or not isinstance(weight, int) or not -100 <= weight <= 100:
            raise HclError(f"{where}: weight must be a whole number from -100 to 100")
        out["Weight"] = weight
    if body:
        raise HclError(f"{where}: unknown key(s) {', '.join(sorted(body))}")
    return out


def parse_constraints(text: str | None) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Job-level ``constraint`` and ``affinity`` blocks -> (Constraints, Affinities)."""
    if not text or not text.strip():
        return [], []
    data = _parse(text)
    constraints: list[dict[str, str]] = []
    affinities: list[dict[str, Any]] = []
    for key, value in data.items():
        if key == "constraint":
            for i, block in enumerate(_blocks(value, key)):
                found = _constraint(block, f"constraint {i + 1}")
                if found:
                    constraints.append(found)
        elif key == "affinity":
            for i, block in enumerate(_blocks(value, key)):
                affinities.append(_affinity(block, f"affinity {i + 1}"))
        else:
            raise HclError(
                f"{key} is not supported here: write constraint {{ ... }} and "
                "affinity { ... } blocks"
            )
    return constraints, affinities


def parse_resources(text: str | None) -> dict[str, Any]:
    """The body of a task's ``resources`` block -> Nomad's ``Resources`` object (partial)."""
    if not text or not text.strip():
        return {}
    data = _parse(text)
    if list(data) == ["resources"]:  # the whole block was written, not only its body
        blocks = _blocks(data["resources"], "resources")
        if len(blocks) != 1:
            raise HclError("holds more than one resources block")
        data = blocks[0]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in RESOURCE_FIELDS:
            out[RESOURCE_FIELDS[key]] = _integer(value, key)
        elif key == "device":
            out["Devices"] = [_device(block, i) for i, block in enumerate(_blocks(value, key))]
        else:
            raise HclError(
                f"{key} is not supported: a resources block may set "
                f"{', '.join(RESOURCE_FIELDS)} and device blocks"
            )
    if "CPU" in out and "Cores" in out:
        raise HclError("sets both cpu and cores; Nomad takes one of them")
    return out


def _device(block: dict[str, Any], index: int) -> dict[str, Any]:
    label, body = next(iter(block.items()), ("", None))
    if len(block) != 1 or not label.startswith('"') or not isinstance(body, dict):
        # python-hcl2 keeps a label's quotes; an unlabelled block shows its attributes
        raise HclError(f'device {index + 1} needs a name: device "nvidia/gpu" {{ count = 1 }}')
    name = _label(label)
    where = f'device "{name}"'
    body = dict(body)
    out: dict[str, Any] = {"Name": name, "Count": 1}
    if "count" in body:
        out["Count"] = _integer(body.pop("count"), f"{where}: count")
    if "constraint" in body:
        out["Constraints"] = [
            _constraint(b, f"{where}: constraint {i + 1}")
            for i, b in enumerate(_blocks(body.pop("constraint"), "constraint"))
        ]
    if "affinity" in body:
        out["Affinities"] = [
            _affinity(b, f"{where}: affinity {i + 1}")
            for i, b in enumerate(_blocks(body.pop("affinity"), "affinity"))
        ]
    if body:
        raise HclError(f"{where}: unknown key(s) {', '.join(sorted(body))}")
    return out


__all__ = ["HclError", "parse_constraints", "parse_resources"]
