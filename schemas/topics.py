"""Topic names of the wire protocol, as value objects that validate themselves.

Every topic lives under ``m/{domain}/c/{channel}/`` (the SuperMQ layout), so a broker can grant a
client exactly one domain and channel. Each proplet reads only topics under its own
``proplets/{id}/`` prefix; the one shared topic is the artifact request queue, which only artifact
servers (the reconciler, the registry proxy) read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TopicError(ValueError):
    """A topic segment or a whole topic does not fit the protocol."""


def check_segment(kind: str, value: str) -> str:
    """Return ``value`` if it can stand as one topic level, else raise ``TopicError``."""
    if not _SEGMENT.match(value):
        raise TopicError(
            f"invalid {kind} {value!r}: use 1-63 characters of letters, digits, '.', '_' or '-',"
            " starting with a letter or digit"
        )
    return value


class Kind(StrEnum):
    """What a topic carries; the value is its last fixed level."""

    ANNOUNCE = "announce"
    HEARTBEAT = "heartbeat"
    PRESENCE = "presence"
    STATE = "state"
    DESIRED = "desired"
    RESULT = "results"
    ARTIFACT_OFFER = "offer"
    ARTIFACT_CHUNK = "chunk"
    ARTIFACT_REQUEST = "request"
    STATUS = "status"
    UPLOAD_OFFER = "upload-offer"
    UPLOAD_CHUNK = "upload-chunk"
    JOB_STATUS = "job-status"


@dataclass(frozen=True, slots=True)
class Parsed:
    """A topic taken apart; fields that do not apply to its kind are empty."""

    kind: Kind
    proplet: str = ""
    task: str = ""
    digest_hex: str = ""
    index: int = -1
    job: str = ""


@dataclass(frozen=True, slots=True)
class Namespace:
    """One domain and channel: the unit of access control and of reconciler sharding."""

    domain: str = "default"
    channel: str = "default"

    def __post_init__(self) -> None:
        check_segment("domain", self.domain)
        check_segment("channel", self.channel)

    @property
    def root(self) -> str:
        return f"m/{self.domain}/c/{self.channel}"

    def proplet_root(self, proplet: str) -> str:
        return f"{self.root}/proplets/{check_segment('proplet id', proplet)}"

    def announce(self, proplet: str) -> str:
        return f"{self.proplet_root(proplet)}/announce"

    def heartbeat(self, proplet: str) -> str:
        return f"{self.proplet_root(proplet)}/heartbeat"

    def presence(self, proplet: str) -> str:
        return f"{self.proplet_root(proplet)}/presence"

    def state(self, proplet: str) -> str:
        return f"{self.proplet_root(proplet)}/state"

    def desired(self, proplet: str) -> str:
        return f"{self.proplet_root(proplet)}/desired"

    def result(self, proplet: str, task: str) -> str:
        return f"{self.proplet_root(proplet)}/results/{check_segment('task name', task)}"

    def artifact_offer(self, proplet: str, digest_hex: str) -> str:
        return f"{self.proplet_root(proplet)}/artifacts/{_check_hex(digest_hex)}/offer"

    def artifact_chunk(self, proplet: str, digest_hex: str, index: int) -> str:
        if index < 0:
            raise TopicError(f"chunk index must be >= 0, got {index}")
        return f"{self.proplet_root(proplet)}/artifacts/{_check_hex(digest_hex)}/{index}"

    def upload_offer(self, proplet: str, digest_hex: str) -> str:
        return f"{self.proplet_root(proplet)}/uploads/{_check_hex(digest_hex)}/offer"

    def upload_chunk(self, proplet: str, digest_hex: str, index: int) -> str:
        if index < 0:
            raise TopicError(f"chunk index must be >= 0, got {index}")
        return f"{self.proplet_root(proplet)}/uploads/{_check_hex(digest_hex)}/{index}"

    def job_status(self, job: str) -> str:
        return f"{self.root}/jobs/{check_segment('job name', job)}/status"

    def artifact_request(self) -> str:
        return f"{self.root}/artifacts/request"

    def status(self) -> str:
        return f"{self.root}/reconciler/status"

    # Subscription filters.
    def proplet_inbox(self, proplet: str) -> str:
        """Everything a proplet reads: its desired set and the artifacts sent to it."""
        return f"{self.proplet_root(proplet)}/#"

    def fleet(self) -> str:
        """Everything proplets publish about themselves, for observers."""
        return f"{self.root}/proplets/+/+"

    def fleet_results(self) -> str:
        return f"{self.root}/proplets/+/results/+"

    def fleet_uploads(self) -> str:
        """Every proplet's uploads: the files its runs wrote, for a job coordinator."""
        return f"{self.root}/proplets/+/uploads/#"

    def jobs(self) -> str:
        return f"{self.root}/jobs/+/status"

    def parse(self, topic: str) -> Parsed:
        """Take a topic of this namespace apart, or raise ``TopicError``."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is outside {self.root}")
        parts = topic[len(prefix) :].split("/")
        if parts == ["artifacts", "request"]:
            return Parsed(Kind.ARTIFACT_REQUEST)
        if parts == ["reconciler", "status"]:
            return Parsed(Kind.STATUS)
        if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "status":
            return Parsed(Kind.JOB_STATUS, job=check_segment("job name", parts[1]))
        if len(parts) < 3 or parts[0] != "proplets":
            raise TopicError(f"unknown topic {topic!r}")
        proplet = check_segment("proplet id", parts[1])
        rest = parts[2:]
        if len(rest) == 1:
            try:
                kind = Kind(rest[0])
            except ValueError:
                raise TopicError(f"unknown topic {topic!r}") from None
            if kind in (Kind.ANNOUNCE, Kind.HEARTBEAT, Kind.PRESENCE, Kind.STATE, Kind.DESIRED):
                return Parsed(kind, proplet=proplet)
        elif len(rest) == 2 and rest[0] == "results":
            return Parsed(Kind.RESULT, proplet=proplet, task=check_segment("task name", rest[1]))
        elif len(rest) == 3 and rest[0] in ("artifacts", "uploads"):
            digest_hex = _check_hex(rest[1])
            upload = rest[0] == "uploads"
            if rest[2] == "offer":
                kind = Kind.UPLOAD_OFFER if upload else Kind.ARTIFACT_OFFER
                return Parsed(kind, proplet=proplet, digest_hex=digest_hex)
            if rest[2].isdigit() and len(rest[2]) <= 9:
                kind = Kind.UPLOAD_CHUNK if upload else Kind.ARTIFACT_CHUNK
                return Parsed(kind, proplet=proplet, digest_hex=digest_hex, index=int(rest[2]))
        raise TopicError(f"unknown topic {topic!r}")


def _check_hex(value: str) -> str:
    if not _HEX64.match(value):
        raise TopicError(f"invalid sha256 hex digest {value!r}")
    return value
