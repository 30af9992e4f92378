"""mercure target plugin: Amazon S3 and S3-compatible object stores (target type ``s3``).

Installed, it registers mercure's target type ``s3`` through the ``register_targets`` hook
(entry point ``target_s3`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_s3.config import S3TargetConfig
from mercure_target_s3.target import S3Target

__all__ = ["S3Target", "S3TargetConfig", "register_targets"]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("s3", S3TargetConfig, S3Target)
