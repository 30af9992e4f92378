"""mercure target plugin: DICOMweb STOW-RS (``dicomweb``).

Installed, it registers mercure's target type ``dicomweb`` through the ``register_targets``
hook (entry point ``target_dicomweb`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_dicomweb.config import DicomWebTargetConfig
from mercure_target_dicomweb.target import DicomWebTarget

__all__ = ["DicomWebTarget", "DicomWebTargetConfig", "register_targets"]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("dicomweb", DicomWebTargetConfig, DicomWebTarget)
