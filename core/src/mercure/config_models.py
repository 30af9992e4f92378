"""The models of mercure's configuration (``mercure.json``): fields, defaults and meaning.

Field names, defaults and meaning are mercure's, so an existing ``mercure.json`` loads
unchanged; fields this project adds all have defaults. Loading and checking a whole file
(target types from the installed plugins, references between sections, rule syntax) is in
:mod:`mercure.config`, which also re-exports these models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    model_validator,
)

from mercure.plugin_settings import PluginInstance
from mercure.secrets import OptionalSecret
from mercure.targets import TargetConfig

if TYPE_CHECKING:
    from mercure.registry import Kind


class ReceiverTLSConfig(BaseModel):
    """DICOM TLS for the built-in receiver (paths to PEM files).

    ``key``/``cert``: the receiver's private key and certificate. ``ca_cert``: the CA
    certificate(s) that client certificates must be signed by; only these are trusted (never
    the system's store). ``require_client_cert``: refuse clients without such a certificate
    (mutual TLS); when false, a certificate a client does present is still verified if
    ``ca_cert`` is set. ``key_password`` decrypts an encrypted key.
    """

    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=11113, ge=0, le=65535)
    key: str
    cert: str
    ca_cert: str = ""
    require_client_cert: bool = True
    key_password: OptionalSecret = None

    @model_validator(mode="after")
    def _client_ca(self) -> ReceiverTLSConfig:
        if self.require_client_cert and not self.ca_cert:
            raise ValueError(
                "require_client_cert needs ca_cert: the CA certificate that client "
                "certificates must be signed by (or set require_client_cert to false)"
            )
        return self


class DicomReceiverConfig(BaseModel):
    """mercure's ``dicom_receiver`` section, plus access control and TLS."""

    model_config = ConfigDict(extra="allow")

    additional_tags: dict[str, str] = {}
    ae_title: str = "ANY-SCP"
    allowed_calling_aets: list[str] = []
    allowed_addresses: list[str] = []
    bind_address: str = "0.0.0.0"
    max_pdu: int = 0
    tls: ReceiverTLSConfig | None = None
    processes: int = Field(default=1, ge=1, le=64)
    """Receiver processes sharing the port (``SO_REUSEPORT``): parallel associations use
    several cores. 1 keeps the receiver in the ``mercure run`` process."""
    association_request_timeout: float = Field(default=10.0, gt=0, le=600)
    """Seconds a new connection has to send its A-ASSOCIATE-RQ (TLS handshake included);
    until then it holds no association slot, and then it is closed."""
    max_pending_connections: int = Field(default=128, ge=1, le=100_000)
    """Connections that have not yet sent their association request, per port and process;
    at the limit the busiest address's oldest one is closed for a new one."""
    max_pending_per_address: int = Field(default=16, ge=1, le=100_000)
    """The same for one source address: its oldest is closed for its new one."""
    max_associations: int = Field(default=64, ge=1, le=10_000)
    """Concurrent associations per port and process; more are rejected as transient
    ("local limit exceeded"). Allow-listed senders have as many slots of their own."""
    max_associations_per_address: int = Field(default=32, ge=1, le=10_000)
    """Concurrent associations one source address may hold."""
    network_timeout: float = Field(default=60.0, gt=0, le=3600)
    """Seconds a sender may stay silent within an association (also mid-dataset) before
    the association is aborted and its slot freed."""


class ProcessingLogsConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    discard_logs: bool = False
    logs_file_store: str | None = None


DEFAULT_MODULE_TIMEOUT = 4 * 3600.0
"""Generous: large AI models on a CPU take long, but a hung module must not block forever."""


class Module(BaseModel):
    """A processing module (usually a container image) as mercure defines it."""

    model_config = ConfigDict(extra="allow")

    docker_tag: str | None = ""
    additional_volumes: str | None = ""
    environment: str | None = ""
    docker_arguments: str | None = ""
    settings: dict[str, Any] = {}
    contact: str | None = ""
    comment: str | None = ""
    constraints: str | None = ""
    resources: str | None = ""
    requires_root: bool | None = False
    # mercure 0.4
    requires_persistence: bool | None = False
    network_enabled: bool | None = False
    # Added by this project (mercure ignores them).
    command: str | list[str] = ""
    """What the built-in ``local`` runner runs: a command line (split like a shell does, no
    shell features), a list of arguments, or a Python entry point ``package.module:function``.
    ``{python}`` as the first word is the interpreter that runs the router."""
    timeout: float = Field(default=DEFAULT_MODULE_TIMEOUT, ge=0)
    """Seconds one run of this module may take before the processor stops it; 0: no limit."""


Action = Literal["route", "both", "process", "discard", "notification"]


class Rule(BaseModel):
    """A routing rule: mercure's fields and defaults. ``target`` may name several targets."""

    model_config = ConfigDict(extra="allow")

    rule: str = "False"
    target: str | list[str] = ""
    disabled: bool = False
    fallback: bool = False
    contact: str = ""
    comment: str = ""
    tags: str = ""
    action: Action = "route"
    action_trigger: Literal["series", "study"] = "series"
    study_trigger_condition: Literal["timeout", "received_series"] = "timeout"
    study_trigger_series: str = ""
    # mercure 0.4: what happens to a study still incomplete study_forcecomplete_trigger seconds
    # after its first series: discard it, proceed with the series that arrived, or keep waiting.
    study_force_completion_action: Literal["discard", "proceed", "ignore"] = "discard"
    priority: Literal["normal", "urgent", "offpeak"] = "normal"
    processing_module: str | list[str] = ""
    processing_settings: list[dict[str, Any]] | dict[str, Any] = {}
    processing_retain_images: bool = False
    notification_email: str = ""
    notification_webhook: str = ""
    notification_payload: str = ""
    notification_payload_body: str = ""
    notification_email_body: str = ""
    notification_email_type: str = "plain"
    notification_trigger_reception: bool = True
    notification_trigger_completion: bool = True
    notification_trigger_completion_on_request: bool = False
    notification_trigger_error: bool = True
    # mercure 0.4
    dynamic_routing: bool = False
    dynamic_routing_allowed_targets: list[str] = []

    @property
    def targets(self) -> list[str]:
        """The distinct target names of this rule, in order."""
        names = [self.target] if isinstance(self.target, str) else list(self.target)
        return list(dict.fromkeys(n for n in names if n))

    @property
    def modules(self) -> list[str]:
        names = (
            [self.processing_module]
            if isinstance(self.processing_module, str)
            else list(self.processing_module)
        )
        return [n for n in names if n]


class Config(BaseModel):
    """The whole ``mercure.json``. Unknown top-level keys are kept and reported as warnings."""

    model_config = ConfigDict(extra="allow")

    appliance_name: str = "master"
    port: int = 11112
    accept_compressed_images: bool = False
    incoming_folder: str = "/opt/mercure/data/incoming"
    studies_folder: str = "/opt/mercure/data/studies"
    outgoing_folder: str = "/opt/mercure/data/outgoing"
    success_folder: str = "/opt/mercure/data/success"
    error_folder: str = "/opt/mercure/data/error"
    discard_folder: str = "/opt/mercure/data/discard"
    processing_folder: str = "/opt/mercure/data/processing"
    router_scan_interval: int = 1
    dispatcher_scan_interval: int = 1
    cleaner_scan_interval: int = 60
    retention: int = 259200
    emergency_clean_percentage: int = 90
    retry_delay: int = 900
    retry_max: int = 5
    series_complete_trigger: int = 60
    study_complete_trigger: int = 900
    study_forcecomplete_trigger: int = 5400
    dicom_receiver: DicomReceiverConfig = DicomReceiverConfig()
    graphite_ip: str = ""
    graphite_port: int = 2003
    influxdb_host: str = ""
    influxdb_token: OptionalSecret = ""
    influxdb_org: str = ""
    influxdb_bucket: str = ""
    bookkeeper: str = "0.0.0.0:8080"
    offpeak_start: str = "22:00"
    offpeak_end: str = "06:00"
    targets: dict[str, SerializeAsAny[TargetConfig]] = {}
    rules: dict[str, Rule] = {}
    modules: dict[str, Module] = {}
    process_runner: str = ""
    processing_runtime: str | None = None
    bookkeeper_api_key: OptionalSecret = None
    features: dict[str, bool] = {}
    processing_logs: ProcessingLogsConfig = ProcessingLogsConfig()
    email_notification_from: str = "mercure@mercure.mercure"
    support_root_modules: bool | None = False
    webhook_certificate_location: str | None = None
    # mercure 0.4
    appliance_color: str = "#FFF"
    jobs_folder: str = "/opt/mercure/data/jobs"
    persistence_folder: str = "/opt/mercure/persistence"
    phi_notifications: bool = False
    server_time: str = "UTC"
    local_time: str = ""
    """The time zone (IANA name such as ``Europe/Berlin``) in which ``offpeak_start`` and
    ``offpeak_end`` are meant; empty: the host's zone (mercure reads the host's clock)."""
    dicom_retrieve: dict[str, Any] = {}
    store_sample_dicom_tags: bool = False

    # Added by this project (mercure ignores them).
    plugin_folder: str | None = None
    dispatcher_workers: int = Field(default=4, ge=1)
    retry_delay_max: int = Field(default=21600, ge=1)
    early_dispatch: bool = True
    """Start sending a series to targets that can stream while it still arrives."""
    log_level: str = "INFO"
    outbox_folder: str = ""
    """Durable queue of notifications; empty: ``outbox`` beside ``outgoing_folder``."""
    notification_retries: int = Field(default=8, ge=1)
    notification_retry_delay: float = Field(default=5.0, gt=0)
    metrics_interval: float = Field(default=10.0, gt=0)
    processor_workers: int = Field(default=1, ge=1)
    """Processing jobs one processor process runs at the same time."""
    ledger_folder: str = ""
    """The ledger's durable queue (and its SQLite database by default); empty: ``ledger``
    beside ``outgoing_folder``."""
    ledger_database: OptionalSecret = ""
    """Where the ledger is written: empty for SQLite in ``ledger_folder``, a file path or
    ``sqlite:///path``, a ``postgresql://`` URL (shared by several router hosts), or ``off``."""
    ledger_retention: int = Field(default=31536000, ge=0)
    """Seconds the ledger keeps history (separate from ``retention`` of the images); 0: always."""
    ledger_digests: bool = True
    """Record the SHA-256 of every delivered instance (read once per file after sending)."""
    plugins: dict[str, dict[str, dict[str, Any]]] = {}
    """Settings of runner, notifier, metrics-sink and receiver instances that mercure has no
    field for, keyed by kind and instance name (:mod:`mercure.plugin_settings`)."""

    _instances: dict[str, list[PluginInstance]] = PrivateAttr(default_factory=dict)

    def folder(self, name: str) -> Path:
        """A spool folder by mercure's short name (``incoming``, ``outgoing``, ...)."""
        return Path(getattr(self, f"{name}_folder"))

    def plugin_instances(self, kind: Kind) -> list[PluginInstance]:
        """The configured instances of ``kind`` with their validated settings."""
        return list(self._instances.get(kind, []))
