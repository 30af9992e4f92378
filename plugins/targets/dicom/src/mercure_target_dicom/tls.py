"""TLS contexts for DICOM over TLS, and plain-language reasons when a TLS connection fails.

Peer verification: the peer's certificate must chain to ``ca_cert`` (a private CA, or the
peer's self-signed certificate itself). Host names are *not* checked by default, because DICOM
peers are configured by IP address and PACS certificates rarely carry IP SANs; DCMTK's
``storescu`` does the same. Set ``tls_check_hostname`` to also require that the certificate
names the configured ``ip`` (as a DNS name or IP SAN).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from mercure.targets import PermanentTargetError

from mercure_target_dicom.config import DicomTLSTargetConfig


def _check_file(target: str, field: str, path: str) -> None:
    if not Path(path).is_file():
        raise PermanentTargetError(
            f"target '{target}': {field} file {path} does not exist or is not a file; "
            f"check the path in the target's {field} setting"
        )


def _is_encrypted(key_file: str) -> bool:
    try:
        head = Path(key_file).read_bytes()[:4096]
    except OSError:
        return False
    return b"ENCRYPTED" in head


def client_context(target: str, config: DicomTLSTargetConfig) -> ssl.SSLContext:
    """An SSL context that verifies the peer against ``ca_cert`` and presents our certificate."""
    if bool(config.tls_key) != bool(config.tls_cert):
        raise PermanentTargetError(
            f"target '{target}': set both tls_key and tls_cert (the client certificate), or "
            "neither (no client certificate)"
        )
    for field, path in (
        ("tls_key", config.tls_key),
        ("tls_cert", config.tls_cert),
        ("ca_cert", config.ca_cert),
    ):
        if path:
            _check_file(target, field, path)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_cert or None)
    except OSError as exc:  # ssl.SSLError included
        raise PermanentTargetError(
            f"target '{target}': ca_cert {config.ca_cert} cannot be used as a PEM certificate file "
            f"({getattr(exc, 'reason', None) or exc}); give the CA certificate(s) the peer's "
            "certificate is "
            "signed with"
        ) from exc
    context.check_hostname = config.tls_check_hostname
    if config.tls_cert:
        password = config.tls_key_password or ""
        try:
            # A password (empty when none is configured) keeps OpenSSL from prompting on stdin.
            context.load_cert_chain(config.tls_cert, config.tls_key, password=password)
        except OSError as exc:  # ssl.SSLError included
            reason = (exc.reason if isinstance(exc, ssl.SSLError) else None) or str(exc)
            if _is_encrypted(config.tls_key):
                hint = (
                    "tls_key_password does not decrypt tls_key"
                    if config.tls_key_password
                    else "tls_key is encrypted: set tls_key_password"
                )
            elif "KEY_VALUES_MISMATCH" in str(reason):
                hint = "tls_key is not the key of tls_cert"
            else:
                hint = "check that both are PEM files"
            raise PermanentTargetError(
                f"target '{target}': cannot load client certificate {config.tls_cert} with key "
                f"{config.tls_key}: {reason}; {hint}"
            ) from exc
    return context


def describe_ssl_error(exc: BaseException, address: str, config: DicomTLSTargetConfig) -> str:
    """What a failed TLS connection means, with the setting to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        if "hostname" in str(detail).lower() or "IP address mismatch" in str(detail):
            hint = (
                "the certificate does not name this address: use the name it was issued "
                "for as ip, or set tls_check_hostname to false"
            )
        else:
            hint = (
                f"check ca_cert ({config.ca_cert or 'system trust store'}): it must hold the "
                "CA that signed the peer's certificate"
            )
        return f"TLS handshake with {address} failed: certificate verify failed: {detail} — {hint}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        return f"TLS handshake with {address} failed: {reason} — {_ssl_hint(reason, config)}"
    return f"TLS connection to {address} failed: {exc}"


def _ssl_hint(reason: str, config: DicomTLSTargetConfig) -> str:
    upper = reason.upper()
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper:
        return "the peer does not speak TLS on this port: use target type 'dicom', or its TLS port"
    if "CERTIFICATE_REQUIRED" in upper or ("HANDSHAKE_FAILURE" in upper and not config.tls_cert):
        return "the peer requires a client certificate: set tls_key and tls_cert"
    if any(a in upper for a in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        return (
            f"the peer does not accept our client certificate ({config.tls_cert or 'none'}): "
            "it must be signed by a CA the peer trusts"
        )
    if "VERSION" in upper or "NO_PROTOCOLS" in upper:
        return "the peer and this router share no TLS version; check the peer's TLS profile"
    if "CIPHER" in upper or "HANDSHAKE_FAILURE" in upper:
        return "the peer and this router share no cipher suite, or the peer refused us"
    return "check the peer's TLS settings and ca_cert, tls_cert, tls_key"


def probe_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    timeout: float,
    server_hostname: str | None,
    config: DicomTLSTargetConfig,
) -> str | None:
    """Connect and shake hands once; return why it fails, or None when it succeeds.

    With TLS 1.3 a server rejects a client certificate only after the handshake, so a short
    read after it catches that alert too (a healthy DICOM peer sends nothing first).
    """
    address = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=min(timeout, 10))
    except OSError:
        return None  # the plain connection failure is reported by the caller
    try:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:
                data = tls.recv(1)
            except TimeoutError:
                return None
            if not data:
                return (
                    f"the peer at {address} closed the TLS connection right after the "
                    "handshake: it may not accept our client certificate "
                    f"({config.tls_cert or 'none configured'})"
                )
            return None
    except ssl.SSLError as exc:
        return describe_ssl_error(exc, address, config)
    except OSError as exc:
        return f"TLS connection to {address} failed: {exc.strerror or exc}"
    finally:
        raw.close()


def speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the peer answers a TLS ClientHello (used to explain a plain connection failure)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=min(timeout, 5))
    except OSError:
        return False
    try:
        with context.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc).upper()
        # A non-TLS peer makes the handshake fail with a record/version error or an EOF.
        return not (
            "WRONG_VERSION_NUMBER" in reason
            or "RECORD_LAYER" in reason
            or "EOF" in reason
            or "PACKET_LENGTH" in reason
            or "UNEXPECTED" in reason
        )
    except OSError:
        return False
    finally:
        raw.close()
