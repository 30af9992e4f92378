"""A mercure processing module for the end-to-end tests, the entry point of a module image.

It reads ``task.json`` and its settings as mercure's modules do and writes one new DICOM
instance per input instance (a new series whose description is the ``label`` setting) and a
``result.json``. Settings: ``runs_log`` (append ``start <task id> <module>`` there),
``sleep`` (seconds before writing), ``exit_code`` (exit with it after printing a message).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid


def main() -> int:
    in_dir = Path(os.environ["MERCURE_IN_DIR"])
    out_dir = Path(os.environ["MERCURE_OUT_DIR"])
    task = json.loads((in_dir / "task.json").read_text())
    settings = task["process"]["settings"]
    module = task["process"]["module_name"]
    if settings.get("runs_log"):
        with open(settings["runs_log"], "a") as fh:
            fh.write(f"start {task['id']} {module}\n")
    print(f"module {module} got {len(list(in_dir.glob('*.dcm')))} instance(s)", flush=True)
    if "exit_code" in settings:
        print(f"module {module} fails on purpose", file=sys.stderr)
        return int(settings["exit_code"])
    time.sleep(float(settings.get("sleep", 0)))
    series = generate_uid()
    count = 0
    for path in sorted(in_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = settings.get("label", "RELABELLED")
        ds.save_as(out_dir / f"{series}#{ds.SOPInstanceUID}.dcm")
        count += 1
    (out_dir / "result.json").write_text(json.dumps({"module": module, "written": count}))
    print(f"module {module} wrote {count} instance(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
