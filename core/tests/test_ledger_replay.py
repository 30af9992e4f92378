"""``mercure rules replay``: a changed configuration evaluated on the series the ledger recorded.

The series go through a real router in this process (receiver, router, dispatcher, ledger);
the replay then reads the ledger and must report exactly the affected series, and leave every
file on disk as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import typer
from mercure.config import load_config
from mercure.ledger import open_queries
from mercure.plugins import build_plugin_manager
from mercure.testing import make_series, start_router, wait_for
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, UltrasoundImageStorage
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    from mercure import cli as cli_module

    if not cli_module.app.registered_groups:
        cli_module._build()
    return cli_module.app


def configuration(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = {
        f"{name}_folder": str(tmp_path / "spool" / name)
        for name in ("incoming", "studies", "outgoing", "success", "error", "discard", "processing")
    }
    targets = {}
    for name in ("pacs_ct", "pacs_mr", "pacs_us", "pacs_new"):
        (tmp_path / name).mkdir()
        targets[name] = {"target_type": "folder", "folder": str(tmp_path / name)}
    data.update(
        port=0,
        series_complete_trigger=1,
        router_scan_interval=1,
        dicom_receiver={"bind_address": "127.0.0.1"},
        targets=targets,
        rules={
            "ct": {"rule": "tags.Modality == 'CT'", "target": "pacs_ct"},
            "mr": {"rule": "tags.Modality == 'MR'", "target": "pacs_mr"},
            "us": {"rule": "tags.Modality == 'US'", "target": "pacs_us"},
        },
    )
    return data


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Size, modification time and digest of every file, but SQLite's ``-shm`` files: the
    shared-memory index where readers register their read marks (coordination, not data)."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("-shm")
    }


def test_replay_reports_exactly_the_affected_series(tmp_path: Path, cli: typer.Typer) -> None:
    data = configuration(tmp_path)
    current = tmp_path / "mercure.json"
    current.write_text(json.dumps(data))
    config, _ = load_config(current, build_plugin_manager().registry)
    sent: dict[str, str] = {}
    kinds = [
        ("CT", CTImageStorage, "head"),
        ("CT", CTImageStorage, "chest"),
        ("MR", MRImageStorage, "brain"),
        ("US", UltrasoundImageStorage, "abdomen"),
    ]
    gen = start_router(config)
    router = next(gen)
    try:
        ae = AE()
        for _, sop_class, _ in kinds:
            ae.add_requested_context(sop_class)
        assoc = ae.associate("127.0.0.1", router.port)
        assert assoc.is_established
        for i, (modality, sop_class, description) in enumerate(kinds):
            files = make_series(
                tmp_path / f"series{i}", 2, modality=modality, sop_class=sop_class,
                series_description=description,
            )  # fmt: skip
            for f in files:
                assert assoc.send_c_store(dcmread(f)).Status == 0
            sent[description] = str(dcmread(files[0]).SeriesInstanceUID)
        assoc.release()
        success = Path(data["success_folder"])
        wait_for(lambda: len(list(success.iterdir())) == 4, 60, what="4 jobs delivered")

        def recorded() -> bool:
            try:
                queries = open_queries(config)
            except Exception:
                return False
            try:
                return len(queries.find(since=0)) == 4
            finally:
                queries.db.close()

        wait_for(recorded, 30, what="the ledger to hold the 4 jobs")
    finally:
        next(gen, None)

    new = copy.deepcopy(data)
    new["rules"]["ct"]["target"] = "pacs_new"
    del new["rules"]["us"]
    new_path = tmp_path / "new.json"
    new_path.write_text(json.dumps(new))
    before = snapshot(tmp_path)

    result = CliRunner().invoke(
        cli, ["rules", "replay", str(new_path), "--since", "1d", "--json", "-c", str(current)]
    )
    assert result.exit_code == 4, result.output
    report = json.loads(result.output)
    assert report["routings"] == 4
    changed = {c["series_uid"]: c for c in report["changed"]}
    assert set(changed) == {sent["head"], sent["chest"], sent["abdomen"]}
    for ct in (sent["head"], sent["chest"]):
        assert changed[ct]["old"]["targets"] == ["pacs_ct"]
        assert changed[ct]["new"]["targets"] == ["pacs_new"]
        assert changed[ct]["changes"] == ["new targets: pacs_new", "lost targets: pacs_ct"]
    us = changed[sent["abdomen"]]
    assert us["new"]["discarded"] and us["new"]["targets"] == []
    assert us["changes"] == ["lost targets: pacs_us", "discarded: no rule matches"]

    text = CliRunner().invoke(cli, ["rules", "replay", str(new_path), "-c", str(current)])
    assert text.exit_code == 4
    assert "4 recorded series routing(s)" in text.output and "3 would change" in text.output

    same = CliRunner().invoke(cli, ["rules", "replay", str(current), "-c", str(current)])
    assert same.exit_code == 0, same.output
    assert "0 would change" in same.output
    assert snapshot(tmp_path) == before  # replay changed nothing on disk


def test_replay_says_what_is_wrong_with_since(tmp_path: Path, cli: typer.Typer) -> None:
    data = configuration(tmp_path)
    current = tmp_path / "mercure.json"
    current.write_text(json.dumps(data))
    result = CliRunner().invoke(
        cli, ["rules", "replay", str(current), "--since", "last week", "-c", str(current)]
    )
    assert result.exit_code == 1
    assert "neither a duration" in result.output
