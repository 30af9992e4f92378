"""What a failed ``rsync`` or ``ssh`` run means: the job's error text, and whether to retry.

A failure that can never succeed as configured (wrong password or key, an unknown or changed
host key, permission denied, rsync missing on the server) is permanent: the job goes to
``error/`` at once. Everything else (connection refused or dropped, timeouts, a full disk) is
retried.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

from mercure.targets import PermanentTargetError, TargetError

#: rsync's exit codes (rsync(1), "EXIT VALUES").
RSYNC_EXIT = {
    1: "syntax or usage error",
    2: "protocol incompatibility",
    3: "errors selecting input/output files or folders",
    4: "requested action not supported",
    5: "error starting the client-server protocol",
    6: "daemon unable to append to its log file",
    10: "error in socket I/O",
    11: "error in file I/O",
    12: "error in the rsync protocol data stream (the connection broke)",
    13: "errors with program diagnostics",
    14: "error in IPC code",
    20: "received SIGUSR1 or SIGINT",
    21: "some error returned by waitpid()",
    22: "error allocating core memory buffers",
    23: "partial transfer due to error",
    24: "partial transfer due to vanished source files",
    25: "the --max-delete limit stopped deletions",
    30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    255: "the ssh connection failed",
}
#: Exit codes that mean the command line or the programs do not fit: never retried.
PERMANENT_EXIT = {1, 2, 4}

# (pattern in stderr, reason, permanent). The first match decides.
_RULES: list[tuple[re.Pattern[str], str, bool]] = [
    (re.compile(r"mercure: run_on_complete is set but"),
     "run_on_complete is set but the server has no executable mercure_complete.sh in the "
     "target folder", True),
    (re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed"),
     "the server's host key has CHANGED (a reinstalled server, or someone intercepting the "
     "connection): check the new key with the server's administrator", True),
    (re.compile(r"No \S+ host key is known for|Host key verification failed"),
     "the server's host key is not known", True),
    (re.compile(r"Permission denied \((publickey|password|keyboard|gssapi|hostbased)|"
                r"Too many authentication failures|Authentication failed"),
     "login failed: check user, password or key (and the account's authorized_keys)", True),
    (re.compile(r"incorrect passphrase|Load key .*: (invalid format|bad permissions|error)"),
     "the private key cannot be used: check key_file and key_passphrase", True),
    (re.compile(r"rsync: (command )?not found|rsync: No such file or directory"),
     "rsync is not installed on the server (or not on the account's PATH)", True),
    (re.compile(r"No space left on device|Disk quota exceeded"),
     "the server's disk is full", False),
    (re.compile(r"Permission denied|Operation not permitted|Read-only file system"),
     "permission denied on the server: give the account write access to the folder", True),
    (re.compile(r"Could not resolve hostname"), "the host name cannot be resolved", False),
    (re.compile(r"Connection refused"), "the server refused the connection (is sshd up?)", False),
    (re.compile(r"Connection timed out|timed out|Timeout"), "the connection timed out", False),
    (re.compile(r"Connection reset|Broken pipe|closed by remote host|Connection closed|"
                r"connection unexpectedly closed"), "the connection was lost", False),
]  # fmt: skip


def tail(text: str, lines: int = 6, limit: int = 1200) -> str:
    """The last lines of a program's output, for an error message."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= limit else "..." + joined[-limit:]


def classify(stderr: str) -> tuple[str, bool] | None:
    """The reason a run failed and whether that is permanent, from its error output."""
    for pattern, reason, permanent in _RULES:
        if pattern.search(stderr):
            return reason, permanent
    return None


def failure(
    what: str,
    code: int,
    stderr: str,
    *,
    meanings: Mapping[int, str] = RSYNC_EXIT,
    permanent_codes: Collection[int] = PERMANENT_EXIT,
) -> TargetError:
    """The error for a run of ``what`` that exited with ``code``."""
    found = classify(stderr)
    known = meanings.get(code) or ("the ssh connection failed" if code == 255 else None)
    status = f"exit {code}: {known}" if known else f"exit {code}"
    if code in permanent_codes:
        reason, permanent = None, True
    elif found is not None:
        reason, permanent = found
    else:
        reason, permanent = None, False
    detail = tail(stderr)
    text = f"{what} failed ({status})" + (f": {reason}" if reason else "")
    text += f"; {detail}" if detail else ""
    return PermanentTargetError(text) if permanent else TargetError(text)
