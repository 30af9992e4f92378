"""The ``dummy`` target: accepts every job and sends nothing (mercure's test target)."""

from __future__ import annotations

from typing import Literal

from mercure import hookimpl
from mercure.registry import RegisterFn
from mercure.targets import DeliveryJob, DeliveryResult, Target, TargetConfig


class DummyTargetConfig(TargetConfig):
    target_type: Literal["dummy"] = "dummy"


class DummyTarget(Target[DummyTargetConfig]):
    """Reports every instance delivered without sending it anywhere."""

    def send(self, job: DeliveryJob) -> DeliveryResult:
        return DeliveryResult.all_delivered(job)

    def test_connection(self) -> str:
        return "dummy target: always reachable"


@hookimpl
def register_targets(register: RegisterFn) -> None:
    register("dummy", DummyTargetConfig, DummyTarget)
