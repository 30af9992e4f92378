"""Fault injection at full size: nothing lost under kills, a vanished target, a full disk.

Runs the scenarios of ``tests/chaos`` (the same code, ``tests/chaos/chaos_support.py``) with
their full parameters and prints the summary of each:

* ``kills``: 2,000 instances (40 series of 50) flow from DCMTK storescu through the receiver,
  router and dispatcher, each a separate ``mercure run --only ...`` process, to DCMTK storescp
  (a ``dicom`` target), while 20 SIGKILLs hit randomly chosen services, each restarted;
* ``target-down``: 1,000 instances, storescp killed three times in the flow and back after 6 s;
* ``disk-full``: 1,000 instances into a spool on a 4 MB tmpfs (needs root; skipped otherwise).

A scenario passes when every instance sent is at the target byte for byte, none is missing,
no task file records a delivery the target lacks, and nothing is left in error/ or on the way;
instances delivered more than once are counted, not failed. The exit code is 1 if any scenario
found a problem (its working folder is then kept and named).

Usage: python bench/chaos.py [kills|target-down|disk-full ...] [--seed N] [--ci-size]
(``MERCURE_CHAOS_SEED=N`` works too; ``MERCURE_BENCH_KEEP=1`` keeps every working folder.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "chaos"))

from chaos_support import CI_SIZE, FULL_SIZE, SCENARIOS, ScenarioSkipped, seed_from_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", metavar="scenario", help=", ".join(SCENARIOS))
    parser.add_argument("--seed", type=int, help="replay a run (default: random, printed)")
    parser.add_argument("--ci-size", action="store_true", help="the reduced size of the tests")
    args = parser.parse_args()
    if not Path("/usr/bin/storescp").exists():
        sys.exit("DCMTK is needed: apt-get install dcmtk")
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    failed = []
    for name in names:
        params = (CI_SIZE if args.ci_size else FULL_SIZE)[name]
        seed = args.seed if args.seed is not None else seed_from_env()
        base = Path(tempfile.mkdtemp(prefix=f"mercure-chaos-{name}-"))
        keep = bool(os.environ.get("MERCURE_BENCH_KEEP"))
        try:
            report = SCENARIOS[name](base, params, seed, lambda line: print(line, flush=True))
        except ScenarioSkipped as exc:
            print(f"chaos scenario {name!r} skipped: {exc}\n", flush=True)
            shutil.rmtree(base, ignore_errors=True)
            continue
        print(report.summary(), flush=True)
        if report.problems:
            failed.append(name)
            keep = True
            print("kill log:\n" + report.kill_log())
        if keep:
            print(f"  working folder kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        print(flush=True)
    if failed:
        print(f"problems in: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
