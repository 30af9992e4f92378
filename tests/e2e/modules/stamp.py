"""A mercure processing module for the tests, run by the ``local`` runner.

It reads ``task.json`` and its settings as mercure's modules do, and writes one new DICOM
instance per input instance (a new series whose description is the ``label`` setting) and a
``result.json``. Settings choose what else it does:

``runs_log``      append ``<event> <task id> <module> <pid>`` lines to this file
``sleep``         seconds to sleep before writing (a module that takes a while)
``exit_code``     exit with this code after writing
``behaviour``     ``hang`` (sleep forever, with a child process), ``nothing`` (write nothing),
                  ``bad_result`` (write a DICOM file and a result.json that is not JSON),
                  ``fail_unless`` (exit 1 unless the file named by ``flag`` exists)
``route``         SeriesDescription of the input -> target name for ``__mercure_routing``
``note``          text for ``__mercure_notification`` (``requested`` from ``request``)
``pids``          write this process's and its child's pid to this file (``hang``)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def log(settings: dict, event: str, task: dict) -> None:
    if settings.get("runs_log"):
        with open(settings["runs_log"], "a") as fh:
            fh.write(f"{event} {task['id']} {task['process']['module_name']} {os.getpid()}\n")


def main() -> int:
    in_dir = Path(os.environ["MERCURE_IN_DIR"])
    out_dir = Path(os.environ["MERCURE_OUT_DIR"])
    task = json.loads((in_dir / "task.json").read_text())
    settings = task["process"]["settings"]
    log(settings, "start", task)
    print(f"module {task['process']['module_name']} settings {json.dumps(settings)}")
    behaviour = settings.get("behaviour", "")
    if behaviour == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(settings["pids"]).write_text(f"{os.getpid()} {child.pid}")
        print("hanging", flush=True)
        time.sleep(600)
    if behaviour == "nothing":
        print("writing nothing")
        return 0
    if behaviour == "fail_unless" and not Path(settings["flag"]).exists():
        print(f"flag {settings['flag']} missing: failing", flush=True)
        log(settings, "failed", task)
        return 1
    time.sleep(float(settings.get("sleep", 0)))

    inputs = sorted(in_dir.glob("*.dcm"))
    series_uids: dict[str, str] = {}
    descriptions = []
    tags_files = 0
    for path in inputs:
        if path.with_suffix(".tags").exists():
            tags_files += 1
        ds = pydicom.dcmread(path)
        descriptions.append(str(ds.SeriesDescription))
        series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SeriesInstanceUID = series_uids[ds.SeriesInstanceUID]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = settings.get("label", "processed")
        ds.save_as(out_dir / f"{ds.SeriesInstanceUID}#{ds.SOPInstanceUID}.dcm")
    result: dict = {
        "module": task["process"]["module_name"],
        "settings": settings,
        "inputs": len(inputs),
        "tags_files": tags_files,
        "input_descriptions": sorted(set(descriptions)),
        "input_names": sorted(p.name for p in inputs),
    }
    if settings.get("note"):
        result["__mercure_notification"] = {
            "text": settings["note"],
            "requested": bool(settings.get("request")),
        }
    route = settings.get("route", {})
    for description in descriptions:
        if description in route:
            result["__mercure_routing"] = {"target": route[description]}
    if behaviour == "bad_result":
        (out_dir / "result.json").write_text("{'this is': not json")
    else:
        (out_dir / "result.json").write_text(json.dumps(result))
    log(settings, "end", task)
    return int(settings.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
