"""C-STORE response statuses: which count as delivered, and what each one means."""

from __future__ import annotations

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

# Ranges of the Storage Service Class (PS3.4 B.2.3), for codes the tables list only in part.
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0xA700, 0xA7FF, "Refused: Out of resources"),
    (0xA900, 0xA9FF, "Error: Data set does not match SOP class"),
    (0xC000, 0xCFFF, "Error: Cannot understand"),
)


def is_delivered(code: int) -> bool:
    """Success and warning statuses (0x0000, 0x0001, 0xB000, 0xB006, 0xB007, ...) mean stored."""
    return code_to_category(code) in ("Success", "Warning")


def describe_status(code: int) -> str:
    """E.g. ``status 0xA700 (Refused: Out of Resources)``."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    if entry is not None:
        meaning = entry[1]
    else:
        meaning = next((text for low, high, text in _RANGES if low <= code <= high), "")
        meaning = meaning or f"{code_to_category(code)}, not a standard C-STORE status"
    return f"status 0x{code:04X} ({meaning})"
