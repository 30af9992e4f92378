"""mercure target plugin: the ``rsync`` program over ssh (target type ``rsync``).

Installed, it registers mercure's target type ``rsync`` through the ``register_targets`` hook
(entry point ``target_rsync`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_rsync.config import RsyncTargetConfig
from mercure_target_rsync.target import RsyncTarget

__all__ = ["RsyncTarget", "RsyncTargetConfig", "register_targets"]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("rsync", RsyncTargetConfig, RsyncTarget)
