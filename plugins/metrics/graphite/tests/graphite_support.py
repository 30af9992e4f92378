"""carbon for the Graphite sink's tests: Debian's ``graphite-carbon`` on free loopback ports.

:class:`Carbon` writes its own ``carbon.conf`` and ``storage-schemas.conf`` (one-second
slots for an hour, so every second's value can be read back) under its own folder, starts
``carbon-cache --nodaemon``, and reads the whisper files it wrote with the ``whisper`` library.
It can be stopped and started again on the same port, as an operator restarting carbon.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import whisper
from mercure.lifecycle import PluginContext
from mercure.testing import PeerProcess, free_port, port_accepts
from mercure_metrics_graphite import GraphiteSettings, GraphiteSink

CARBON_CACHE = shutil.which("carbon-cache") or "/usr/bin/carbon-cache"


@dataclass
class Carbon:
    root: Path
    port: int = field(default_factory=free_port)
    process: PeerProcess | None = None

    @property
    def whisper_dir(self) -> Path:
        return self.root / "storage" / "whisper"

    def configure(self) -> Carbon:
        conf = self.root / "conf"
        for folder in (conf, self.whisper_dir, self.root / "log", self.root / "run"):
            folder.mkdir(parents=True, exist_ok=True)
        (conf / "carbon.conf").write_text(
            f"""[cache]
STORAGE_DIR = {self.root / "storage"}/
LOCAL_DATA_DIR = {self.whisper_dir}/
WHITELISTS_DIR = {self.root / "storage" / "lists"}/
CONF_DIR = {conf}/
LOG_DIR = {self.root / "log"}/
PID_DIR = {self.root / "run"}/
ENABLE_LOGROTATION = False
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {self.port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = 0
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = 0
MAX_CREATES_PER_MINUTE = inf
MAX_UPDATES_PER_SECOND = inf
WHISPER_AUTOFLUSH = True
LOG_LISTENER_CONN_SUCCESS = True
# Tagged series are stored by carbon itself; its tag database would be graphite-web's:
# point it at a loopback port where nothing listens (never port 80).
GRAPHITE_URL = http://127.0.0.1:{free_port()}
"""
        )
        (conf / "storage-schemas.conf").write_text(
            "[everything]\npattern = .*\nretentions = 1s:1h\n"
        )
        (conf / "storage-aggregation.conf").write_text(
            "[everything]\npattern = .*\nxFilesFactor = 0\naggregationMethod = sum\n"
        )
        return self

    def start(self) -> Carbon:
        if self.process is None:
            self.configure()
            self.process = PeerProcess(
                "carbon-cache",
                [
                    CARBON_CACHE,
                    f"--config={self.root / 'conf' / 'carbon.conf'}",
                    "--nodaemon",
                    "start",
                ],
                lambda: port_accepts(self.port),
                self.root / "carbon.log",
            )
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
            # carbon removes its pid file on a clean stop; a kill would leave it behind.
            (self.root / "run" / "carbon-cache-a.pid").unlink(missing_ok=True)

    # -- what carbon stored ------------------------------------------------------------------

    def file_of(self, path: str) -> Path:
        """The whisper file of a path (tagged names are stored under their sha256)."""
        if ";" in path:
            digest = hashlib.sha256(path.encode()).hexdigest()
            return self.whisper_dir / "_tagged" / digest[:3] / digest[3:6] / f"{digest}.wsp"
        return self.whisper_dir.joinpath(*path.split(".")).with_suffix(".wsp")

    def paths(self) -> set[str]:
        """Every untagged path that has a whisper file."""
        found = set()
        for file in self.whisper_dir.rglob("*.wsp"):
            rel = file.relative_to(self.whisper_dir)
            if rel.parts[0] != "_tagged":
                found.add(".".join(rel.with_suffix("").parts))
        return found

    def values(self, path: str, since: float = 0) -> dict[int, float]:
        """The stored values of a path, by second, from ``since`` (default: the last hour)."""
        file = self.file_of(path)
        if not file.exists():
            return {}
        now = int(time.time()) + 1
        start = max(int(since), now - 3599) if since else now - 3599
        (begin, _end, step), values = whisper.fetch(str(file), start, now)
        return {begin + i * step: v for i, v in enumerate(values) if v is not None}

    def total(self, path: str, since: float = 0) -> float:
        return sum(self.values(path, since).values())


def make_sink(appliance: str = "master", **settings: Any) -> GraphiteSink:
    """A sink with these settings, validated as the configuration would be; not yet started."""
    return GraphiteSink(
        "graphite",
        GraphiteSettings.model_validate(settings),
        PluginContext("metrics_sink", "graphite", appliance),
    )
