"""Memory of the dicom target's sender for one large instance: 1 GiB against 4 MiB.

Each size is sent into DCMTK's storescp by a fresh Python process that imports the plugin,
notes its resident memory, sends the one file through the dicom target's sender, and reports
its peak resident memory (``VmHWM``); the growth is the difference. The lean sender reads and
writes the dataset in PDU-sized pieces, so its growth should not depend on the size; the
pynetdicom path (``send_c_store``) is measured too, for information. The delivered file is
compared with the sent one (SHA-256 of the dataset).

Usage: python bench/send_memory.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

from common import StoreSCP, report, require_dcmtk, settle_disk, workdir

CHILD = r"""
import json, sys
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0].rstrip(":"), int(line.split()[1]) / 1024

from mercure_target_dicom.sender import Peer, Sender
before = dict(hwm())["VmRSS"]
port, path, lean = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
peer = Peer("127.0.0.1", port, "STORESCP", "MERCURE", 120, lean=lean)
outcome = Sender(peer).send([path])
print(json.dumps({"before": before, "peak": dict(hwm())["VmHWM"],
                  "delivered": outcome.delivered == [path.name], "failed": outcome.failed}))
"""


def write_instance(path: Path, frames: int, rows: int = 512, columns: int = 512) -> Path:
    """A multi-frame CT instance written frame by frame (never whole in memory)."""
    from mercure.testing import make_dataset
    from pydicom.uid import generate_uid

    ds = make_dataset(generate_uid(), generate_uid(), 0, rows=rows, columns=columns)
    ds.NumberOfFrames = frames
    del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (rows * columns * 2 // 256)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * len(frame)))
        for i in range(frames):
            fh.write(frame[i % 256 :] + frame[: i % 256])
    return path


def dataset_digest(path: Path) -> str:
    from mercure_target_dicom.wire import dataset_offset

    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(dataset_offset(fh))
        while chunk := fh.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def measure(scp: StoreSCP, path: Path, lean: bool) -> dict[str, float]:
    scp.clear()
    settle_disk()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(scp.port), str(path), "1" if lean else "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["delivered"]:
        raise RuntimeError(f"not delivered: {result['failed']}")
    [got] = [p for p in scp.folder.iterdir() if not p.name.startswith(".")]
    if dataset_digest(got) != dataset_digest(path):
        raise RuntimeError(f"{path.name} arrived changed")
    return {"growth_mib": round(result["peak"] - result["before"], 1), "peak_mib": result["peak"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the large instance")
    args = parser.parse_args()
    require_dcmtk()
    with workdir("send-memory") as base:
        small = write_instance(base / "small" / "small.dcm", frames=8)
        large = write_instance(base / "large" / "large.dcm", frames=args.mib * 2)
        scp = StoreSCP(base / "scp")
        try:
            figures = {
                f"{kind}_{label}": measure(scp, path, lean)
                for kind, lean in (("lean", True), ("pynetdicom", False))
                for label, path in (("small", small), ("large", large))
            }
        finally:
            scp.stop()
    lean_ratio = (figures["lean_large"]["peak_mib"]) / figures["lean_small"]["peak_mib"]
    print(
        f"lean sender: peak RSS {figures['lean_small']['peak_mib']:.1f} MiB (4 MiB instance) vs "
        f"{figures['lean_large']['peak_mib']:.1f} MiB ({args.mib} MiB instance), growth "
        f"{figures['lean_small']['growth_mib']:.1f} vs {figures['lean_large']['growth_mib']:.1f} "
        f"MiB: ratio {lean_ratio:.2f}; pynetdicom path: growth "
        f"{figures['pynetdicom_small']['growth_mib']:.1f} vs "
        f"{figures['pynetdicom_large']['growth_mib']:.1f} MiB"
    )
    report("send_memory", {"large_mib": args.mib, "ratio": round(lean_ratio, 3), **figures})


if __name__ == "__main__":
    main()
