"""What to send and how: the job's instances, their presentation contexts, and conversions.

The presentation contexts are built from the SOP classes and transfer syntaxes actually in
the job's files (read from the file meta information only). Each stored syntax gets a context
of its own, so the peer can accept it and the file is sent as stored; where a lossless
conversion exists (between the uncompressed little-endian syntaxes, and deflated to
inflated) a fallback context offers Explicit/Implicit VR Little Endian too. Compressed data is
never decompressed: if the peer refuses its syntax, that instance fails with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mercure import instances
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from mercure_target_dicom.peer import Peer

MAX_CONTEXTS = 128  # DICOM allows at most 128 presentation contexts per association
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
CONVERTIBLE = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)


@dataclass(frozen=True)
class Instance:
    """One file to send, described by its file meta information."""

    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


@dataclass
class SendOutcome:
    """Per file name: delivered, or failed with a reason; ``error`` explains an interruption."""

    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def read_instance(path: Path) -> Instance:
    """Read a file's meta information; ``ValueError`` says why the file cannot be sent."""
    info = instances.read_instance(path)
    return Instance(
        path,
        UID(info.sop_class_uid),
        UID(info.sop_instance_uid),
        UID(info.transfer_syntax_uid),
    )


def plan_contexts(instances: Iterable[Instance]) -> list[tuple[UID, list[UID]]]:
    """The presentation contexts for ``instances``: stored syntaxes first, then a fallback."""
    syntaxes: dict[UID, list[UID]] = {}
    for inst in instances:
        seen = syntaxes.setdefault(inst.sop_class, [])
        if inst.transfer_syntax not in seen:
            seen.append(inst.transfer_syntax)
    contexts: list[tuple[UID, list[UID]]] = []
    for sop_class, stored in syntaxes.items():
        contexts.extend((sop_class, [ts]) for ts in stored)
        if any(ts in CONVERTIBLE for ts in stored):
            fallback = [ts for ts in FALLBACK_SYNTAXES if ts not in stored]
            if fallback:
                contexts.append((sop_class, fallback))
    return contexts


def group_for_associations(instances: list[Instance]) -> list[list[Instance]]:
    """Split instances so that each group needs at most 128 presentation contexts.

    Nearly every job fits one association; only a job with dozens of SOP classes is split.
    """
    by_class: dict[UID, list[Instance]] = {}
    for inst in instances:
        by_class.setdefault(inst.sop_class, []).append(inst)
    groups: list[list[Instance]] = []
    current: list[Instance] = []
    count = 0
    for members in by_class.values():
        needed = len(plan_contexts(members))
        if current and count + needed > MAX_CONTEXTS:
            groups.append(current)
            current, count = [], 0
        current.extend(members)
        count += needed
    if current:
        groups.append(current)
    return groups


def covered(contexts: list[tuple[UID, list[UID]]], inst: Instance) -> bool:
    """Whether an association proposing ``contexts`` can carry the instance (maybe converted)."""
    proposed = {(sop, ts) for sop, syntaxes in contexts for ts in syntaxes}
    if (inst.sop_class, inst.transfer_syntax) in proposed:
        return True
    return inst.transfer_syntax in CONVERTIBLE and any(
        (inst.sop_class, ts) in proposed for ts in FALLBACK_SYNTAXES
    )


#: What to do with an instance on an association: send as stored, convert, or fail (reason).
AS_STORED, CONVERT = "as stored", "convert"


def how_to_send(peer: Peer, inst: Instance, accepted: list[UID]) -> tuple[str | None, str]:
    """``(AS_STORED | CONVERT, "")`` or ``(None, reason)`` given the syntaxes the peer accepted."""
    if inst.transfer_syntax in accepted:
        return AS_STORED, ""
    if not accepted:
        return None, (
            f"the peer {peer.label} did not accept {inst.sop_class.name} "
            f"({inst.sop_class}); configure it to accept this SOP class"
        )
    convertible = [ts for ts in accepted if ts in CONVERTIBLE]
    if inst.transfer_syntax not in CONVERTIBLE or not convertible:
        kind = "compressed" if inst.transfer_syntax.is_compressed else "stored"
        return None, (
            f"the peer {peer.label} accepts {inst.sop_class.name} only as "
            f"{', '.join(ts.name for ts in accepted)}, not as {inst.transfer_syntax.name} "
            f"in which {inst.path.name} is {kind}; it is not converted (lossy or not "
            "losslessly convertible): configure the peer to accept that transfer syntax"
        )
    return CONVERT, ""
