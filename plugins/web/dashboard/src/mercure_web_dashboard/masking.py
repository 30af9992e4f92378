"""What the dashboard never shows: the configuration's secrets, and patient data to roles that
may not see it.

Secrets are found two ways: fields declared with :data:`mercure.secrets.Secret` /
``OptionalSecret`` (whatever their name), and fields whose name says password, secret, token,
key or credential. Passwords in URLs (``postgresql://user:pw@host``) and the query strings of
webhook URLs (which often carry the token) are masked too. Every value masked is also
collected, so that the server can remove it from any response body as a last line of defence
(an error message that quotes a URL, a target's answer).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mercure.config import Config
from mercure.secrets import resolve_secret
from pydantic import BaseModel

MASK = "••••••"
_SECRET_NAME = re.compile(
    r"(pass(word|phrase)?|secret|token|api_?key|private_?key|credential|auth)", re.IGNORECASE
)
_NOT_SECRET = {"key_prefix", "tls_key", "keyfile", "key_file", "ssh_key_file", "token_url"}
"""Names that match the pattern but hold a path or a public value (the *file* of a key)."""
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_MIN_REDACT = 4
"""Shorter secret values are masked in the view but not searched for in every response."""

PHI_TAGS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientMotherBirthName",
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "RequestingPhysician",
        "InstitutionName",
        "StudyID",
        "mrn",
        "acc",
        "patient_name",
        "patient_id",
        "accession",
    }
)


def _is_secret_field(model: type[BaseModel], name: str) -> bool:
    info = model.model_fields.get(name)
    if info is not None:
        for meta in info.metadata:
            if getattr(meta, "func", None) is resolve_secret:
                return True
    return name.lower() not in _NOT_SECRET and bool(_SECRET_NAME.search(name))


def _mask_url(value: str, found: set[str]) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    netloc = parts.netloc
    if parts.password:
        found.add(parts.password)
        netloc = netloc.replace(f":{parts.password}@", f":{MASK}@")
    query = parts.query
    if query:
        found.add(query)
        query = MASK
    path = parts.path
    # Webhook URLs (Slack, Teams) carry their token in the path: keep the host only.
    if parts.scheme in ("http", "https") and len(path) > 24:
        found.add(path)
        path = "/" + MASK
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


class SecretMasker:
    """Masks one configuration and remembers every secret value it saw."""

    def __init__(self) -> None:
        self.found: set[str] = set()

    def value(self, value: Any, *, secret: bool) -> Any:
        if secret:
            if value in (None, "", [], {}):
                return value
            for item in _strings(value):
                self.found.add(item)
            return MASK
        if isinstance(value, str) and _URL.match(value):
            return _mask_url(value, self.found)
        return value

    def model(self, obj: BaseModel) -> dict[str, Any]:
        data = obj.model_dump(mode="json")
        out: dict[str, Any] = {}
        for name, dumped in data.items():
            raw = getattr(obj, name, None)
            out[name] = self.any(raw, dumped, secret=_is_secret_field(type(obj), name))
        return out

    def any(self, raw: Any, dumped: Any, *, secret: bool = False) -> Any:
        if secret:
            return self.value(dumped, secret=True)
        if isinstance(raw, BaseModel):
            return self.model(raw)
        if isinstance(dumped, dict):
            raw_map = raw if isinstance(raw, dict) else {}
            return {
                k: self.any(raw_map.get(k, v), v, secret=_plain_secret_name(str(k)))
                for k, v in dumped.items()
            }
        if isinstance(dumped, list):
            raws = raw if isinstance(raw, list) else dumped
            return [self.any(r, d) for r, d in zip(raws, dumped, strict=False)]
        return self.value(dumped, secret=False)


def _plain_secret_name(name: str) -> bool:
    return name.lower() not in _NOT_SECRET and bool(_SECRET_NAME.search(name))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [str(value)] if value is not None else []


def masked_config(config: Config) -> tuple[dict[str, Any], set[str]]:
    """The configuration as JSON data with every secret masked, and the secret values."""
    masker = SecretMasker()
    data = masker.model(config)
    # The plugins section is raw JSON: mask by each instance's validated model where one
    # exists (declared Secret fields), by name otherwise. Resolved references count too.
    for inst in _instances(config):
        section = data.get("plugins", {})
        for kind_key, instances in section.items():
            if not isinstance(instances, dict) or inst.name not in instances:
                continue
            settings = masker.model(inst.settings)
            raw = instances[inst.name]
            if isinstance(raw, dict):
                for key in list(raw):
                    if key in settings and settings[key] == MASK:
                        raw[key] = MASK
            section[kind_key] = instances
    return data, {s for s in masker.found if len(s) >= _MIN_REDACT}


def _instances(config: Config) -> list[Any]:
    from mercure.registry import KINDS

    found = []
    for kind in KINDS:
        if kind == "target":
            continue
        found.extend(config.plugin_instances(kind))
    return found


def secret_values(config: Config) -> set[str]:
    return masked_config(config)[1]


def redact(text: str, secrets_found: set[str]) -> str:
    """``text`` with every known secret value replaced by the mask (longest first)."""
    for value in sorted(secrets_found, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_tags(tags: dict[str, Any], allowed: bool) -> dict[str, Any]:
    if allowed:
        return tags
    return {k: (MASK if k in PHI_TAGS and v not in (None, "") else v) for k, v in tags.items()}


def mask_phi(value: Any, allowed: bool) -> Any:
    """A JSON-like value with patient fields (by key, at any depth) masked."""
    if allowed:
        return value
    if isinstance(value, dict):
        return {
            k: (MASK if k in PHI_TAGS and v not in (None, "") else mask_phi(v, allowed))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_phi(v, allowed) for v in value]
    return value


__all__ = [
    "MASK",
    "PHI_TAGS",
    "mask_phi",
    "mask_tags",
    "masked_config",
    "redact",
    "secret_values",
]
