"""The ssh command that rsync and the remote steps run, built per job in a private folder.

For one job a folder readable by the router's user only holds: an ``ssh`` wrapper script with
every option (so paths need no quoting in rsync's ``-e``), the askpass helper and its socket
(:mod:`mercure_target_rsync.askpass`), a known_hosts file when the host key is pinned by its
fingerprint, the private key when it was given as a secret rather than a file, and the tree of
links that rsync sends. The folder is removed when the job's send ends.

Host keys: ``StrictHostKeyChecking=yes`` against ``known_hosts`` (ssh's own files by
default), or ``accept-new`` with ``trust_on_first_use``; with ``host_key_fingerprint`` the
server's keys are read with ``ssh-keyscan``, the one with that fingerprint is written to the
private known_hosts, and ssh is told to accept only that key type, so the connection itself is
checked against the pinned key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

from mercure.targets import PermanentTargetError, TargetError

from mercure_target_rsync.askpass import AskpassServer
from mercure_target_rsync.config import RsyncTargetConfig
from mercure_target_rsync.errors import PERMANENT_EXIT, RSYNC_EXIT, classify, failure, tail

HOST_KEY_ALGORITHMS = {"ssh-rsa": "rsa-sha2-512,rsa-sha2-256"}
#: The environment variables ssh and rsync get from the router's (plus ``LC_*``).
PASSED_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "SSH_AUTH_SOCK"}
)


def fingerprint_of(blob_b64: str) -> str:
    digest = hashlib.sha256(base64.b64decode(blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def program(name: str, what: str) -> str:
    """The full path of a local program; missing: a configuration error that says so."""
    found = shutil.which(name)
    if found is None:
        raise PermanentTargetError(
            f"the {what} program {name!r} is not installed on this host (apt-get install "
            f"{'rsync' if what == 'rsync' else 'openssh-client'}), or set {what}_path"
        )
    return found


def _option_path(path: str) -> str:
    """A path as an ssh ``-o`` value: quoted (ssh splits on spaces), ``%`` not expanded."""
    if '"' in path:
        raise PermanentTargetError(f"path {path!r} must not contain a double quote")
    return '"' + path.replace("%", "%%") + '"'


class SshContext:
    """The private folder, askpass server and ssh wrapper of one job's send."""

    def __init__(self, config: RsyncTargetConfig, target: str) -> None:
        self.config = config
        self.target = target
        self.where = f"{config.user}@{config.host}:{config.port}"
        self.folder = Path(tempfile.mkdtemp(prefix="mercure-rsync-"))  # mode 0700
        self.askpass: AskpassServer | None = None
        self.env: dict[str, str] = {}
        self.wrapper = self.folder / "ssh"

    # -- setup ---------------------------------------------------------------------------------

    def __enter__(self) -> SshContext:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.askpass is not None:
            self.askpass.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _setup(self) -> None:
        cfg = self.config
        ssh = program(cfg.ssh_path, "ssh")
        options = [
            "-p", str(cfg.port),
            "-l", cfg.user,
            "-o", f"ConnectTimeout={cfg.timeout}",
            "-o", "ServerAliveInterval=15",
            "-o", f"ServerAliveCountMax={max(2, cfg.timeout // 15)}",
            "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=no",
            "-o", "ControlPath=none",
            "-o", "ForwardAgent=no",
            "-o", "ForwardX11=no",
            "-o", "ClearAllForwardings=yes",
            "-o", "PermitLocalCommand=no",
            "-o", "RequestTTY=no",
            "-o", "UpdateHostKeys=no",
            "-o", "NumberOfPasswordPrompts=1",
        ]  # fmt: skip
        options += self._host_key_options()
        key = self._key_file()
        methods = []
        if key:
            options += ["-i", key, "-o", "IdentitiesOnly=yes"]
            methods.append("publickey")
        if cfg.password:
            methods += ["password", "keyboard-interactive"]
        if methods:
            options += ["-o", "PreferredAuthentications=" + ",".join(methods)]
        secrets = [s for s in (cfg.password, cfg.key_passphrase) if s]
        # Only what ssh and rsync need: the router's environment may hold secrets of any
        # target (``${env:...}`` references), and children would inherit them all.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if (k in PASSED_ENV or k.startswith("LC_")) and not any(s in v for s in secrets)
        }
        if secrets:
            self.askpass = AskpassServer(
                self.folder, password=cfg.password, passphrase=cfg.key_passphrase, key_file=key
            )
            self.env.update(self.askpass.start())
        else:
            options += ["-o", "BatchMode=yes"]  # nothing to answer: never wait for a prompt
        self.wrapper.write_text("#!/bin/sh\nexec " + shlex.join([ssh, *options]) + ' "$@"\n')
        self.wrapper.chmod(0o700)

    @property
    def ssh_command(self) -> list[str]:
        """The wrapper, run by ``/bin/sh`` rather than executed itself.

        Executing a script that was just written fails with "Text file busy" (ETXTBSY) when
        another thread forks while the file is still open for writing in this process; a
        shell that only reads it is immune, and several jobs send at once.
        """
        return ["/bin/sh", str(self.wrapper)]

    def _key_file(self) -> str | None:
        cfg = self.config
        if cfg.key_file:
            path = Path(cfg.key_file).expanduser()
            if not path.is_file():
                raise PermanentTargetError(f"key_file {path} does not exist or is not a file")
            return str(path)
        if cfg.private_key:
            path = self.folder / "id"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(cfg.private_key.strip() + "\n")
            return str(path)
        return None

    def _host_key_options(self) -> list[str]:
        cfg = self.config
        if cfg.host_key_fingerprint:
            key_type, blob = self._pinned_key(cfg.host_key_fingerprint)
            known = self.folder / "known_hosts"
            known.write_text(f"{known_name(cfg.host, cfg.port)} {key_type} {blob}\n")
            algorithms = HOST_KEY_ALGORITHMS.get(key_type, key_type)
            return [
                "-o", f"UserKnownHostsFile={_option_path(str(known))}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes",
                "-o", f"HostKeyAlgorithms={algorithms}",
            ]  # fmt: skip
        options = []
        if cfg.known_hosts:
            path = Path(cfg.known_hosts).expanduser()
            options += [
                "-o", f"UserKnownHostsFile={_option_path(str(path))}",
                "-o", "GlobalKnownHostsFile=/dev/null",
            ]  # fmt: skip
        else:
            path = Path("~/.ssh/known_hosts").expanduser()
        if cfg.trust_on_first_use:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # ssh would not
            options += ["-o", "StrictHostKeyChecking=accept-new"]
        else:
            options += ["-o", "StrictHostKeyChecking=yes"]
        return options

    def scan_host_keys(self) -> list[tuple[str, str]]:
        """The server's host keys as ``(type, base64)``, read with ``ssh-keyscan``."""
        cfg = self.config
        scanner = Path(program(cfg.ssh_path, "ssh")).with_name("ssh-keyscan")
        exe = str(scanner) if scanner.exists() else program("ssh-keyscan", "ssh")
        try:
            run = subprocess.run(
                [exe, "-p", str(cfg.port), "-T", str(min(cfg.timeout, 30)), "--", cfg.host],
                capture_output=True,
                text=True,
                timeout=cfg.timeout + 10,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise TargetError(f"reading the host keys of {cfg.host}:{cfg.port} timed out") from None
        keys = []
        for line in run.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#"):
                keys.append((parts[1], parts[2]))
        if not keys:
            raise TargetError(
                f"cannot read the host keys of {cfg.host}:{cfg.port} (ssh-keyscan: "
                f"{tail(run.stderr) or 'no answer'}); is the server up?"
            )
        return keys

    def _pinned_key(self, pinned: str) -> tuple[str, str]:
        keys = self.scan_host_keys()
        for key_type, blob in keys:
            if fingerprint_of(blob) == pinned:
                return key_type, blob
        offered = ", ".join(f"{t} {fingerprint_of(b)}" for t, b in keys)
        raise PermanentTargetError(
            f"no host key of {known_name(self.config.host, self.config.port)} matches "
            f"host_key_fingerprint {pinned}: the server offers {offered}. Either the server was "
            "reinstalled or someone intercepts the connection: check with its administrator"
        )

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        what: str,
        argv: list[str],
        *,
        timeout: float | None,
        meanings: Mapping[int, str] = RSYNC_EXIT,
        permanent_codes: Collection[int] = PERMANENT_EXIT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` with this job's environment; a failure raises the mapped error."""
        try:
            done = subprocess.run(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                start_new_session=True,  # no terminal: ssh asks the askpass helper only
            )
        except subprocess.TimeoutExpired:
            raise TargetError(
                f"{what} on {self.where} did not finish within {timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise PermanentTargetError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            raise self.explain(what, done.returncode, done.stderr, meanings, permanent_codes)
        return done

    def explain(
        self,
        what: str,
        code: int,
        stderr: str,
        meanings: Mapping[int, str] = RSYNC_EXIT,
        permanent_codes: Collection[int] = PERMANENT_EXIT,
    ) -> TargetError:
        """The error for a failed run; an unknown host key gets its fingerprint named."""
        error = failure(
            f"{what} on {self.where}",
            code,
            stderr,
            meanings=meanings,
            permanent_codes=permanent_codes,
        )
        found = classify(stderr)
        if found is not None and found[0].startswith("the server's host key has CHANGED"):
            sent = re.search(r"SHA256:[A-Za-z0-9+/]{43}", stderr)
            offending = re.search(r"Offending \S+ key in (\S+)", stderr)
            host = known_name(self.config.host, self.config.port)
            return PermanentTargetError(
                f"{what} on {self.where}: the host key of {host} has CHANGED: the server now "
                f"sends {sent.group(0) if sent else '(fingerprint not shown)'}, which is not "
                f"the key in {offending.group(1) if offending else 'known_hosts'}. Either the "
                "server was reinstalled or someone intercepts the connection: check the new "
                "fingerprint with the server's administrator before replacing the old key "
                f"(ssh-keygen -R '{host}')"
            )
        if found is not None and found[0].startswith("the server's host key is not known"):
            try:
                offered = ", ".join(f"{t} {fingerprint_of(b)}" for t, b in self.scan_host_keys())
            except TargetError:
                offered = "(cannot be read now)"
            source = self.config.known_hosts or "~/.ssh/known_hosts"
            host = known_name(self.config.host, self.config.port)
            return PermanentTargetError(
                f"{what} on {self.where}: the host key of {host} is not known; the server "
                f"offers {offered}. Check that fingerprint with the server's administrator, "
                f"then add the key to {source} (ssh-keyscan -p {self.config.port} "
                f"{self.config.host} >> {source}), or pin it with host_key_fingerprint, or set "
                "trust_on_first_use"
            )
        return error

    def remote(
        self,
        what: str,
        script: str,
        *args: str,
        meanings: Mapping[int, str],
        permanent_codes: Collection[int],
        timeout: float | None = None,
    ) -> str:
        """Run a POSIX sh ``script`` with ``args`` on the server; returns its output."""
        command = " ".join(["sh", "-c", shlex.quote(script), "mercure", *map(shlex.quote, args)])
        done = self.run(
            what,
            [*self.ssh_command, "--", self.config.host, command],
            timeout=timeout or self.config.timeout * 4,
            meanings=meanings,
            permanent_codes=permanent_codes,
        )
        return done.stdout
