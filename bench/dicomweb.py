"""DICOMweb target: the router's peak memory by job size, and STOW-RS throughput.

Both against a real Orthanc with its DICOMweb plugin (Debian ``orthanc orthanc-dicomweb``),
a fresh one (new storage) for each measurement.

* memory: a fresh ``mercure run`` subprocess (all services) receives a series from DCMTK
  storescu and delivers it to Orthanc with the ``dicomweb`` target; its peak resident set
  size (``VmHWM``) is read once the job is in ``success/``. ``memory_ratio`` =
  peak(1,000 instances) / peak(50) (goal: at most 1.3).
* throughput: a job of ``--count`` instances delivered by the core's Dispatcher with the
  ``dicomweb`` target, against the same files posted straight to Orthanc in the same
  batches by httpx (bodies built in memory beforehand) and by curl (bodies written to files
  beforehand). ``throughput_ratio`` = time(best reference) / time(router) (goal: at least
  0.7). Each is the median of ``--repeat`` runs.

Usage: python bench/dicomweb.py [--small 50] [--large 1000] [--count 500] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import httpx
from common import free_port, make_ct_series, report, require_dcmtk, router, spool_config, workdir
from common import storescu as start_storescu
from memory import peak_rss_kib
from mercure.testing import ORTHANC_BIN, ORTHANC_DICOMWEB_PLUGIN, DispatchEnv, Orthanc

BATCH = 50
CURL = Path("/usr/bin/curl")


def fresh_orthanc(base: Path, name: str) -> Orthanc:
    folder = base / f"orthanc-{name}-{uuid.uuid4().hex[:6]}"
    return Orthanc(folder, dicomweb=True).start()


def done_jobs(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.exists() else 0


def measure_memory(base: Path, count: int, size: int) -> int:
    files = make_ct_series(base / f"series-{count}", count, size=size)
    orthanc = fresh_orthanc(base, f"mem{count}")
    try:
        for attempt in range(3):  # a port picked free may be taken before the router binds it
            try:
                peak = route_through_router(base, files, orthanc, f"{count}-{attempt}")
                break
            except PortTaken:
                if attempt == 2:
                    raise
        stored = orthanc.get("/statistics")["CountInstances"]
        if stored != count:
            raise RuntimeError(f"Orthanc holds {stored} instances, not {count}")
    finally:
        orthanc.stop()
        shutil.rmtree(base / f"series-{count}", ignore_errors=True)
    return peak


class PortTaken(RuntimeError):
    pass


def route_through_router(base: Path, files: list[Path], orthanc: Orthanc, name: str) -> int:
    """``mercure run`` receives ``files`` and delivers them; its peak RSS in KiB."""
    port = free_port()
    spool = base / f"spool-{name}"
    config = spool_config(
        spool,
        port=port,
        targets={
            "web": {
                "target_type": "dicomweb",
                "url": orthanc.dicomweb_url,
                "batch_max_instances": BATCH,
            }
        },
        rules={"all": {"rule": "True", "target": "web", "action": "route"}},
    )
    try:
        running = router(config, base)
        proc = running.__enter__()
    except RuntimeError as exc:
        if "before listening" in str(exc):
            raise PortTaken(str(exc)) from exc
        raise
    try:
        sender = start_storescu(files, port)
        sender.communicate(timeout=1800)
        deadline = time.monotonic() + 900
        while done_jobs(spool / "success") < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the job did not reach success/ within 900 s")
            time.sleep(0.1)
        return peak_rss_kib(proc.pid)
    finally:
        running.__exit__(None, None, None)


def multipart(files: list[Path], boundary: str) -> bytes:
    out = bytearray()
    for path in files:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += path.read_bytes() + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def batches(files: list[Path]) -> list[list[Path]]:
    return [files[i : i + BATCH] for i in range(0, len(files), BATCH)]


def time_httpx(base: Path, files: list[Path]) -> float:
    orthanc = fresh_orthanc(base, "httpx")
    bodies = [multipart(b, "bench") for b in batches(files)]
    headers = {
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=bench',
        "Accept": "application/dicom+json",
    }
    try:
        with httpx.Client(timeout=300) as client:
            started = time.perf_counter()
            for body in bodies:
                rsp = client.post(f"{orthanc.dicomweb_url}/studies", content=body, headers=headers)
                rsp.raise_for_status()
            return time.perf_counter() - started
    finally:
        orthanc.stop()


def time_curl(base: Path, files: list[Path]) -> float:
    orthanc = fresh_orthanc(base, "curl")
    paths = []
    for index, batch in enumerate(batches(files)):
        path = base / f"body-{index}.bin"
        path.write_bytes(multipart(batch, "bench"))
        paths.append(path)
    args = [str(CURL)]
    for n, path in enumerate(paths):  # one curl, one kept-alive connection, as the router
        if n:
            args.append("--next")
        args += [
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-H",
            'Content-Type: multipart/related; type="application/dicom"; boundary=bench',
            "-H",
            "Accept: application/dicom+json",
            "-H",
            "Expect:",  # no 100-continue round trip (curl waits up to 1 s for it)
            "--data-binary",
            f"@{path}",
            f"{orthanc.dicomweb_url}/studies",
        ]
    try:
        started = time.perf_counter()
        subprocess.run(args, check=True, timeout=600)
        return time.perf_counter() - started
    finally:
        orthanc.stop()
        for path in paths:
            path.unlink()


def time_router(base: Path, files: list[Path]) -> float:
    orthanc = fresh_orthanc(base, "router")
    env = DispatchEnv(base / f"dispatch-{uuid.uuid4().hex[:6]}")
    try:
        env.start(
            {
                "web": {
                    "target_type": "dicomweb",
                    "url": orthanc.dicomweb_url,
                    "batch_max_instances": BATCH,
                }
            }
        )
        ref = env.job(files, "web")
        started = time.perf_counter()
        ref, task = env.deliver(ref)
        elapsed = time.perf_counter() - started
        if ref.state != "success":
            raise RuntimeError(f"router delivery failed: {task.error}")
        return elapsed
    finally:
        env.close()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--count", type=int, default=500, help="instances for the throughput")
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    require_dcmtk()
    if not ORTHANC_BIN.exists() or not ORTHANC_DICOMWEB_PLUGIN.exists():
        raise SystemExit("Orthanc with DICOMweb is needed: apt-get install orthanc-dicomweb")
    with workdir("dicomweb") as base:
        small = measure_memory(base, args.small, args.size)
        large = measure_memory(base, args.large, args.size)
        files = make_ct_series(base / "throughput", args.count, size=args.size)
        megabytes = round(sum(f.stat().st_size for f in files) / 1e6, 1)
        runs: dict[str, list[float]] = {"router": [], "httpx": [], "curl": []}
        for _ in range(args.repeat):  # interleaved, so drift hits all alike
            runs["router"].append(time_router(base, files))
            runs["httpx"].append(time_httpx(base, files))
            if CURL.exists():
                runs["curl"].append(time_curl(base, files))
    median = {k: statistics.median(v) for k, v in runs.items() if v}
    reference = min(v for k, v in median.items() if k != "router")
    report(
        "dicomweb",
        {
            "instances": [args.small, args.large],
            "image_size": args.size,
            "peak_rss_mib": [round(small / 1024, 1), round(large / 1024, 1)],
            "memory_ratio": round(large / small, 3),
            "throughput_instances": args.count,
            "batch": BATCH,
            "seconds": {k: round(v, 3) for k, v in median.items()},
            "throughput_ratio": round(reference / median["router"], 3),
            "megabytes": megabytes,
        },
    )
    print(json.dumps({"goal": {"memory_ratio": "<= 1.3", "throughput_ratio": ">= 0.7"}}))


if __name__ == "__main__":
    main()
