"""The ``rsync`` target: each job's instances into one folder on a server, with rsync over ssh.

One send is: a check-and-prepare step over ssh (is the target folder there, did an earlier
try publish this job already, make the hidden staging folder), one ``rsync`` run into the
staging folder (rsync itself skips files complete there from an earlier, broken try), a
finishing step that writes ``.complete`` and renames the folder, and mercure's
``mercure_complete.sh`` when ``run_on_complete`` is set. See
:mod:`mercure.remote_layout` for the layout and :mod:`mercure_target_rsync.ssh` for
authentication and host keys.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from mercure.logs import get_logger
from mercure.remote_layout import RemoteLayout, base_folder, marker_probe, marker_record
from mercure.targets import DeliveryJob, DeliveryResult, PermanentTargetError, Target

from mercure_target_rsync import remote
from mercure_target_rsync.config import RsyncTargetConfig
from mercure_target_rsync.ssh import SshContext, program

log = get_logger("mercure.target.rsync")


class RsyncTarget(Target[RsyncTargetConfig]):
    """Sends a job with rsync into a hidden staging folder and renames it when complete.

    ``send`` may run in several threads at once: each call has its own private folder, ssh
    wrapper, askpass socket and child processes, and shares nothing with the others.
    """

    def send(self, job: DeliveryJob) -> DeliveryResult:
        rsync = program(self.config.rsync_path, "rsync")
        plan = RemoteLayout.of(self.config, self.name).plan(job)
        if plan.failed:
            return plan.incomplete()
        paths, planned = plan.paths, plan.files
        with SshContext(self.config, self.name) as ssh:
            answer = ssh.remote(
                "preparing the series folder",
                remote.PREPARE,
                paths.base,
                paths.parent,
                paths.final,
                paths.alternate,
                paths.staging,
                marker_probe(job.task_id),
                meanings=remote.MEANINGS,
                permanent_codes=remote.PERMANENT,
            )
            done = _line_value(answer, "DONE")
            dest = done or paths.staging
            uploaded = self._rsync(ssh, rsync, planned, dest)
            final = done
            if final is None:
                finished = ssh.remote(
                    "publishing the series folder",
                    remote.FINALIZE,
                    paths.staging,
                    paths.final,
                    paths.alternate,
                    marker_record(job.task_id, self.name),
                    meanings=remote.MEANINGS,
                    permanent_codes=remote.PERMANENT,
                )
                final = _line_value(finished, "FINAL") or paths.final
                if final != paths.final:
                    log.warning(
                        "the series folder exists already (another job's series); "
                        "used a name of its own",
                        target=self.name,
                        task_id=job.task_id,
                        taken=paths.final,
                        folder=final,
                    )
            if self.config.run_on_complete:
                ssh.remote(
                    "mercure_complete.sh",
                    remote.HOOK,
                    paths.base,
                    final,
                    self.name,
                    job.task_id,
                    meanings={},
                    permanent_codes=(),
                    timeout=max(self.config.timeout * 10, 600),
                )
        return plan.delivered(log, final, uploaded, already_complete=done is not None)

    def _rsync(self, ssh: SshContext, rsync: str, planned: dict[str, Path], dest: str) -> int:
        """Send ``planned`` into ``dest`` on the server; returns how many files were sent."""
        tree = ssh.folder / "tree"
        tree.mkdir()
        for rel, local in planned.items():
            link = tree / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(local.resolve(), link)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        argv = [
            rsync,
            "--recursive",
            "--times",
            "--copy-links",  # the tree holds links to the job's files
            "--protect-args",
            f"--chmod={self.config.chmod}",
            f"--timeout={self.config.timeout}",
            "--out-format=%n",
            "-e",
            shlex.join(ssh.ssh_command),
        ]
        if self.config.compress:
            argv.append("--compress")
        argv += ["--", f"{tree}/", f"{self.config.user}@{host}:{dest}/"]
        done = ssh.run("rsync", argv, timeout=None)
        return sum(1 for line in done.stdout.splitlines() if line and not line.endswith("/"))

    def test_connection(self) -> str:
        program(self.config.rsync_path, "rsync")
        base = base_folder(self.config.folder)
        with SshContext(self.config, self.name) as ssh:
            out = ssh.remote(
                "checking the target folder",
                _TEST,
                base,
                "1" if self.config.run_on_complete else "0",
                meanings=remote.MEANINGS,
                permanent_codes=remote.PERMANENT,
            )
        if "rsync" not in out:
            raise PermanentTargetError(f"rsync is not installed on {ssh.where}")
        return f"logged in to {ssh.where}; folder {base} is writable; {out.strip()}"


_TEST = r"""
base=$1 hook=$2
if [ ! -d "$base" ]; then echo "mercure: folder $base does not exist" >&2; exit 21; fi
if [ ! -w "$base" ]; then echo "mercure: folder $base: Permission denied" >&2; exit 22; fi
if [ "$hook" = 1 ] && [ ! -x "$base/mercure_complete.sh" ]; then
    echo "mercure: run_on_complete is set but $base/mercure_complete.sh is missing" >&2
    exit 26
fi
command -v rsync >/dev/null 2>&1 && rsync --version | head -n 1
"""


def _line_value(output: str, key: str) -> str | None:
    """``<value>`` of the last line ``<key> <value>`` in a remote step's output."""
    found = None
    for line in output.splitlines():
        if line.startswith(key + " "):
            found = line[len(key) + 1 :]
    return found
