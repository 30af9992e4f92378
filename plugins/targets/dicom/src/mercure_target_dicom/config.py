"""Configuration models of the ``dicom`` and ``dicomtls`` target types.

The field names and meanings are mercure's (``ip``, ``port``, ``aet_target``, ``aet_source``,
``pass_sender_aet``, ``pass_receiver_aet``, and for TLS ``tls_key``, ``tls_cert``,
``ca_cert``), so an existing ``mercure.json`` loads unchanged. mercure stores the port as a
string; an int is accepted too. The fields this plugin adds (``timeout``, ``max_pdu``,
``tls_check_hostname``, ``tls_key_password``, ``lean_sender``, ``async_operations``) all
have defaults.
"""

from __future__ import annotations

from typing import Any, Literal

from mercure.secrets import OptionalSecret
from mercure.targets import TargetConfig
from pydantic import Field, field_validator

#: mercure's value of ``ip`` that means "send back to the address the series came from".
RETURN_TO_SENDER = "sender"
DEFAULT_PORT = 104


class DicomTargetConfig(TargetConfig):
    """A DICOM node reached with C-STORE (mercure's ``DicomTarget``)."""

    target_type: Literal["dicom"] = "dicom"
    ip: str
    port: str = str(DEFAULT_PORT)
    aet_target: str = ""
    aet_source: str | None = ""
    pass_sender_aet: bool = False
    pass_receiver_aet: bool = False
    # Added by this project.
    timeout: float = Field(default=60.0, gt=0)
    max_pdu: int = Field(default=0, ge=0)
    #: Send with the lean C-STORE sender (False: pynetdicom's send_c_store, as before).
    lean_sender: bool = True
    #: C-STORE requests kept outstanding if the peer agrees (asynchronous operations window;
    #: 1 = one at a time and not proposed: some peers drop associations that propose it).
    async_operations: int = Field(default=1, ge=1, le=64)

    @field_validator("ip")
    @classmethod
    def _strip_ip(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("ip must name the peer's address (or be 'sender' to send back)")
        return value

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: Any) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            return str(DEFAULT_PORT)  # mercure sends to 104 when the port is empty
        if isinstance(value, bool):
            raise ValueError("port must be a number between 1 and 65535")
        text = str(value).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(f"port must be a number between 1 and 65535, not {value!r}")
        return str(int(text))

    @field_validator("aet_target", "aet_source", mode="before")
    @classmethod
    def _aet(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if len(value) > 16:
                raise ValueError(f"an AE title has at most 16 characters, not {len(value)}")
        return value

    @property
    def port_number(self) -> int:
        return int(self.port)

    @property
    def returns_to_sender(self) -> bool:
        return self.ip.lower() == RETURN_TO_SENDER


class DicomTLSTargetConfig(DicomTargetConfig):
    """A DICOM node reached with C-STORE over TLS (mercure's ``DicomTLSTarget``).

    ``tls_key``/``tls_cert`` are the PEM client key and certificate this router presents;
    ``ca_cert`` is the PEM file of the CA(s) (or the peer's own certificate) that the peer's
    certificate must chain to; empty uses the system's trust store.
    """

    target_type: Literal["dicomtls"] = "dicomtls"  # type: ignore[assignment]
    tls_key: str = ""
    tls_cert: str = ""
    ca_cert: str = ""
    # Added by this project.
    tls_check_hostname: bool = False
    tls_key_password: OptionalSecret = None
