"""mercure target plugin: XNAT through its image session import service (``xnat``).

Installed, it registers mercure's target type ``xnat`` through the ``register_targets`` hook
(entry point ``target_xnat`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_xnat.config import XnatTargetConfig
from mercure_target_xnat.target import XnatTarget

__all__ = ["XnatTarget", "XnatTargetConfig", "register_targets"]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("xnat", XnatTargetConfig, XnatTarget)
