"""Helpers of the docker runner's tests (imported by the tests and the fixtures)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import docker


@dataclass(frozen=True)
class DockerEngine:
    url: str
    folder: Path
    pid: int

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=60)
