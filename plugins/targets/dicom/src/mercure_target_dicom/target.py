"""The ``dicom`` and ``dicomtls`` target implementations."""

from __future__ import annotations

from functools import partial

from mercure.logs import get_logger
from mercure.tags import RECEIVER_AET, SENDER_ADDRESS, SENDER_AET
from mercure.targets import DeliveryJob, DeliveryResult, PermanentTargetError, Target

from mercure_target_dicom.config import DicomTargetConfig, DicomTLSTargetConfig
from mercure_target_dicom.sender import (
    DEFAULT_CALLED_AET,
    DEFAULT_CALLING_AET,
    Peer,
    Sender,
    echo,
)
from mercure_target_dicom.tls import client_context, probe_tls

log = get_logger("mercure.target.dicom")


#: Seconds an association waits for the next file of an arriving series before it is released.
STREAM_IDLE_RELEASE = 5.0


class DicomTarget(Target[DicomTargetConfig]):
    """C-STORE to a DICOM node; one association per job, every response status checked.

    Streaming: while a series still arrives, the dispatcher hands the job over early and the
    association stays open for the instances that follow (see :meth:`Sender.stream`).
    """

    streaming = True

    def peer(self, job: DeliveryJob | None = None) -> Peer:
        """The peer for ``job`` (return-to-sender and passed AE titles come from its tags)."""
        cfg = self.config
        host = cfg.ip
        calling = cfg.aet_source or DEFAULT_CALLING_AET
        called = cfg.aet_target or DEFAULT_CALLED_AET
        if job is not None:
            if cfg.returns_to_sender:
                host = _sender_address(self.name, job)
            if cfg.pass_sender_aet:
                calling = _tag(self.name, job, SENDER_AET, "pass_sender_aet") or calling
            if cfg.pass_receiver_aet:
                called = _tag(self.name, job, RECEIVER_AET, "pass_receiver_aet") or called
        return Peer(
            host=host,
            port=cfg.port_number,
            called_aet=called,
            calling_aet=calling,
            timeout=cfg.timeout,
            max_pdu=cfg.max_pdu,
            lean=cfg.lean_sender,
            async_window=cfg.async_operations,
        )

    def send(self, job: DeliveryJob) -> DeliveryResult:
        peer = self.peer(job)
        sender = Sender(peer, task_id=job.task_id)
        if job.more is not None:
            idle = min(STREAM_IDLE_RELEASE, self.config.timeout / 2)
            outcome = sender.stream(list(job.files), job.more, idle, job.confirm)
        else:
            outcome = sender.send(list(job.files))
        log.info(
            "C-STORE finished",
            target=self.name,
            task_id=job.task_id,
            peer=peer.label,
            delivered=len(outcome.delivered),
            failed=len(outcome.failed),
        )
        return DeliveryResult(
            delivered=outcome.delivered, failed=outcome.failed, error=outcome.error
        )

    def test_connection(self) -> str:
        if self.config.returns_to_sender:
            return (
                "this target sends back to each series' sender ('ip': 'sender'); the address "
                "is known only per job, so there is nothing to test"
            )
        return echo(self.peer())


class DicomTLSTarget(DicomTarget):
    """C-STORE over TLS: client certificate, peer verified against ``ca_cert``."""

    config: DicomTLSTargetConfig

    def peer(self, job: DeliveryJob | None = None) -> Peer:
        plain = super().peer(job)
        cfg = self.config
        context = client_context(self.name, cfg)
        server_hostname = plain.host if cfg.tls_check_hostname else None
        probe = partial(
            probe_tls, plain.host, plain.port, context, cfg.timeout, server_hostname, cfg
        )
        return Peer(
            host=plain.host,
            port=plain.port,
            called_aet=plain.called_aet,
            calling_aet=plain.calling_aet,
            timeout=plain.timeout,
            max_pdu=plain.max_pdu,
            ssl_context=context,
            server_hostname=server_hostname,
            tls_probe=probe,
            lean=plain.lean,
            async_window=plain.async_window,
        )


def _sender_address(target: str, job: DeliveryJob) -> str:
    address = (job.tags.get(SENDER_ADDRESS) or "").strip()
    if not address:
        address = str(getattr(job.task.info, "sender_address", "") or "").strip()
    if not address or address == "MISSING":
        raise PermanentTargetError(
            f"target '{target}' sends back to the sender ('ip': 'sender'), but job "
            f"{job.task_id} does not record the address it came from (tag {SENDER_ADDRESS}); "
            "route it to a target with a fixed ip"
        )
    return address


def _tag(target: str, job: DeliveryJob, tag: str, option: str) -> str:
    value = (job.tags.get(tag) or "").strip()
    if not value:
        log.warning(
            "job has no AE title to pass; using the configured one",
            target=target,
            task_id=job.task_id,
            tag=tag,
            option=option,
        )
    return value
