"""mercure target plugin: DICOM C-STORE (``dicom``) and DICOM over TLS (``dicomtls``).

Installed, it registers mercure's target types ``dicom`` and ``dicomtls`` through the
``register_targets`` hook (entry point ``target_dicom`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_dicom.config import DicomTargetConfig, DicomTLSTargetConfig
from mercure_target_dicom.target import DicomTarget, DicomTLSTarget

__all__ = [
    "DicomTLSTarget",
    "DicomTLSTargetConfig",
    "DicomTarget",
    "DicomTargetConfig",
    "register_targets",
]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("dicom", DicomTargetConfig, DicomTarget)
    register("dicomtls", DicomTLSTargetConfig, DicomTLSTarget)
