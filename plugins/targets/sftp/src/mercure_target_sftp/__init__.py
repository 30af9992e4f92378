"""mercure target plugin: SFTP with paramiko (target type ``sftp``).

Installed, it registers mercure's target type ``sftp`` through the ``register_targets`` hook
(entry point ``target_sftp`` in the ``mercure`` group).
"""

from __future__ import annotations

from mercure import hookimpl
from mercure.registry import RegisterFn

from mercure_target_sftp.config import SftpTargetConfig
from mercure_target_sftp.target import SftpTarget

__all__ = ["SftpTarget", "SftpTargetConfig", "register_targets"]


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("sftp", SftpTargetConfig, SftpTarget)
