import hashlib
from pathlib import Path

import pytest

from proplet.artifacts import ArtifactStore, DigestMismatch, digest_hex
from proplet.registry import (
    ArtifactNotFound,
    Backoff,
    ContentMismatch,
    CredentialsRefused,
    InvalidImage,
    Pulls,
    RegistryError,
    RegistryUnreachable,
    Repository,
    parse_image,
)
from schemas.messages import sha256_digest

DATA = b"\0asm\x01\0\0\0"
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_sha256_digest() -> None:
    assert sha256_digest(DATA) == DIGEST
    assert sha256_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@pytest.mark.parametrize(
    "digest",
    ["", "sha256:", "sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64, "SHA256:" + "0" * 64],
)
def test_digest_hex_rejects_malformed(digest: str) -> None:
    with pytest.raises(ValueError, match="not a sha256 digest"):
        digest_hex(digest)


def test_put_then_read(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.has(DIGEST)
    assert store.read(DIGEST) is None

    path = store.put(DIGEST, DATA)

    assert path == tmp_path / "sha256" / DIGEST.removeprefix("sha256:")
    assert store.path(DIGEST) == path
    assert store.has(DIGEST)
    assert store.read(DIGEST) == DATA
    assert [p.name for p in (tmp_path / "sha256").iterdir()] == [path.name]  # no temp files left


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put(DIGEST, DATA)
    store.put(DIGEST, DATA)
    assert store.read(DIGEST) == DATA


def test_put_rejects_bytes_that_do_not_match(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(DigestMismatch, match=f"expected {DIGEST}, got sha256:"):
        store.put(DIGEST, DATA + b"tampered")
    assert not store.has(DIGEST)
    assert list(tmp_path.rglob("*")) == []


def test_digest_mismatch_is_a_value_error() -> None:
    assert issubclass(DigestMismatch, ValueError)


def test_malformed_digest_is_rejected_before_any_io(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError):
        store.put("sha256:../../etc/passwd", DATA)
    assert not (tmp_path / "sha256").exists()


# -- bounded, least recently used --------------------------------------------------------


class Clock:
    """Seconds since the epoch that move only when told (whole seconds survive any mtime)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


def blob(n: int, size: int = 100) -> tuple[str, bytes]:
    data = bytes([n]) * size
    return sha256_digest(data), data


A, B, C, D = (blob(n) for n in range(4))


def bounded(
    root: Path, clock: Clock, max_bytes: int = 250, pinned: set[str] | None = None
) -> ArtifactStore:
    """A store of at most ``max_bytes``; ``pinned`` is read at each eviction, so tests edit it."""
    return ArtifactStore(root, max_bytes=max_bytes, pinned=lambda: set(pinned or ()), clock=clock)


def test_least_recently_put_is_evicted_first(tmp_path: Path) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock)
    for digest, data in (A, B):
        store.put(digest, data)
        clock.tick()
    assert store.used_bytes == 200

    store.put(*C)  # 300 > 250: the oldest goes

    assert not store.has(A[0])
    assert store.has(B[0]) and store.has(C[0])
    assert store.digests() == [B[0], C[0]]
    assert store.used_bytes == 200
    assert sorted(p.name for p in (tmp_path / "sha256").iterdir()) == sorted(
        digest_hex(d) for d in (B[0], C[0])
    )


@pytest.mark.parametrize("use", ["read", "touch", "put"])
def test_a_use_moves_an_artifact_to_the_back_of_the_line(tmp_path: Path, use: str) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock)
    store.put(*A)
    clock.tick()
    store.put(*B)
    clock.tick()
    if use == "read":
        assert store.read(A[0]) == A[1]
    elif use == "touch":
        assert store.touch(A[0])
    else:
        store.put(*A)
    clock.tick()

    store.put(*C)

    assert store.has(A[0])
    assert not store.has(B[0])


def test_the_bound_holds_across_many_puts(tmp_path: Path) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock, max_bytes=1000)
    stored = []
    for n in range(30):
        digest, data = blob(n, size=90 + n)
        store.put(digest, data)
        stored.append(digest)
        clock.tick()
        assert store.used_bytes <= 1000
        assert store.has(digest)  # the newest always stays
    on_disk = sum(p.stat().st_size for p in (tmp_path / "sha256").iterdir())
    assert on_disk == store.used_bytes
    # The newest 8 (112..119 bytes, 924 in all) fit; a 9th (111 bytes) would not.
    assert store.digests() == stored[-8:]


def test_an_artifact_larger_than_the_bound_is_kept_alone(tmp_path: Path) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock, max_bytes=150)
    store.put(*A)
    clock.tick()
    big = blob(9, size=400)
    store.put(*big)
    assert store.digests() == [big[0]]


def test_pinned_artifacts_are_never_evicted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    pinned = {A[0]}
    store = bounded(tmp_path, clock, pinned=pinned)
    for item in (A, B):
        store.put(*item)
        clock.tick()

    store.put(*C)  # A is the oldest but pinned: B goes
    assert store.has(A[0]) and not store.has(B[0]) and store.has(C[0])

    pinned.add(C[0])
    clock.tick()
    store.put(*D)  # A, C pinned, D just stored: nothing can go
    assert all(store.has(d) for d, _ in (A, C, D))
    assert store.used_bytes == 300
    assert "over its bound of 250" in caplog.text

    pinned.clear()
    assert store.trim() == [A[0]]  # once unpinned, the oldest goes
    assert store.used_bytes == 200


def test_recency_and_size_survive_a_new_store(tmp_path: Path) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock)
    store.put(*A)
    clock.tick()
    store.put(*B)
    clock.tick()
    store.read(A[0])  # A is now the most recently used

    again = bounded(tmp_path, Clock(clock.now + 100))
    assert again.digests() == [B[0], A[0]]
    assert again.used_bytes == 200
    assert again.read(A[0]) == A[1]

    again.put(*C)
    assert not again.has(B[0])
    assert again.has(A[0]) and again.has(C[0])


def test_a_smaller_bound_on_restart_trims_on_demand(tmp_path: Path) -> None:
    clock = Clock()
    store = ArtifactStore(tmp_path, clock=clock)  # unbounded
    for item in (A, B, C, D):
        store.put(*item)
        clock.tick()
    assert store.trim() == []

    smaller = bounded(tmp_path, clock, max_bytes=200, pinned={A[0]})
    assert smaller.digests() == [A[0], B[0], C[0], D[0]]  # opening evicts nothing
    assert smaller.trim() == [B[0], C[0]]  # A is pinned
    assert smaller.digests() == [A[0], D[0]] and smaller.used_bytes == 200
    assert bounded(tmp_path, clock, max_bytes=100).trim() == [A[0]]


def test_eviction_removes_precompiled_copies(tmp_path: Path) -> None:
    clock = Clock()
    store = bounded(tmp_path, clock)
    compiled = tmp_path / "compiled"
    compiled.mkdir()
    for digest, data in (A, B):
        store.put(digest, data)
        clock.tick()
        for flavour in ("plain", "metered"):
            (compiled / f"{digest_hex(digest)}.{flavour}.30.0.0.cwasm").write_bytes(b"x" * 999)

    store.put(*C)

    assert sorted(p.name for p in compiled.iterdir()) == sorted(
        f"{digest_hex(B[0])}.{flavour}.30.0.0.cwasm" for flavour in ("plain", "metered")
    )
    assert store.used_bytes == 200  # precompiled copies are not counted


def test_a_file_deleted_behind_the_stores_back_is_forgotten(tmp_path: Path) -> None:
    store = bounded(tmp_path, Clock())
    store.put(*A)
    store.path(A[0]).unlink()
    assert store.read(A[0]) is None
    assert not store.touch(A[0])
    assert store.used_bytes == 0


def test_put_file_moves_a_verified_file_in(tmp_path: Path) -> None:
    store = bounded(tmp_path, Clock())
    staged = store.staging_dir() / ".tmp-pull-1"
    staged.write_bytes(A[1])

    path = store.put_file(A[0], staged)

    assert path == store.path(A[0]) and path.read_bytes() == A[1]
    assert not staged.exists()
    assert store.used_bytes == 100


def test_put_file_refuses_and_deletes_a_file_that_does_not_match(tmp_path: Path) -> None:
    store = bounded(tmp_path, Clock())
    staged = store.staging_dir() / ".tmp-pull-1"
    staged.write_bytes(A[1][:-1])  # truncated

    with pytest.raises(DigestMismatch, match=f"expected {A[0]}, got sha256:.* \\(99 bytes\\)"):
        store.put_file(A[0], staged)

    assert not staged.exists()
    assert not store.has(A[0])
    assert list((tmp_path / "sha256").iterdir()) == []


def test_opening_a_store_removes_interrupted_writes(tmp_path: Path) -> None:
    store = bounded(tmp_path, Clock())
    store.put(*A)
    (tmp_path / "sha256" / ".tmp-abc").write_bytes(b"half")
    (tmp_path / "sha256" / "not-a-digest").write_bytes(b"kept, not indexed")

    again = bounded(tmp_path, Clock())

    assert not (tmp_path / "sha256" / ".tmp-abc").exists()
    assert (tmp_path / "sha256" / "not-a-digest").exists()
    assert again.digests() == [A[0]]


def test_a_negative_bound_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        ArtifactStore(tmp_path, max_bytes=-1)


# -- the schedule of direct pulls (proplet.registry.Pulls) ---------------------------------

IMAGE = "127.0.0.1:5000/team/app@sha256:" + "ab" * 32


def pulls(parallel: int = 4) -> Pulls:
    return Pulls(Backoff(initial=1.0, maximum=8.0), parallel=parallel, jitter=lambda: 0.0)


def test_a_pull_is_due_at_once_and_forgotten_when_it_succeeds() -> None:
    schedule = pulls()
    assert schedule.want(A[0], IMAGE, 100, now=0.0) is not None
    assert schedule.want(A[0], IMAGE, 100, now=0.0) is None  # already known

    started = schedule.due(0.0)

    assert [(p.digest, p.attempts, p.running) for p in started] == [(A[0], 1, True)]
    assert schedule.due(0.0) == []  # running: not started twice
    assert schedule.next_deadline() is None
    done = schedule.finished(A[0], None, 0.5)
    assert done is not None and done.reason is None
    assert A[0] not in schedule


def test_an_unreachable_registry_is_retried_with_doubling_delays() -> None:
    schedule = pulls()
    schedule.want(A[0], IMAGE, 100, now=0.0)
    now = 0.0
    seen = []
    for _ in range(6):
        assert len(schedule.due(now)) == 1
        failed = schedule.finished(A[0], RegistryUnreachable("registry unreachable: x"), now)
        assert failed is not None and not failed.permanent
        assert schedule.due(now) == []
        assert schedule.next_deadline() == failed.next_try
        seen.append((failed.next_try - now, failed.reason))
        now = failed.next_try
    assert [delay for delay, _ in seen] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert seen[0][1] == "registry unreachable: x (retry 2 in 1.0s)"
    assert seen[2][1] == "registry unreachable: x (retry 4 in 4.0s)"


@pytest.mark.parametrize(
    "error",
    [ArtifactNotFound("not found: blob"), CredentialsRefused("registry refused the credentials")],
)
def test_errors_a_person_must_fix_wait_the_longest_delay(error: RegistryError) -> None:
    schedule = pulls()
    schedule.want(A[0], IMAGE, 100, now=0.0)
    schedule.due(0.0)
    failed = schedule.finished(A[0], error, 0.0)
    assert failed is not None and failed.permanent
    assert failed.next_try == 8.0
    assert failed.reason == f"{error} (retry 2 in 8.0s)"
    assert schedule.due(7.9) == []
    assert [p.attempts for p in schedule.due(8.0)] == [2]
    assert schedule.finished(A[0], None, 8.1) is not None  # fixed: done


def test_content_mismatch_is_retried_like_a_transient_fault() -> None:
    schedule = pulls()
    schedule.want(A[0], IMAGE, 100, now=0.0)
    schedule.due(0.0)
    failed = schedule.finished(A[0], ContentMismatch("does not match its digest"), 0.0)
    assert failed is not None and not failed.permanent and failed.next_try == 1.0


def test_jitter_spreads_retries_by_at_most_a_fifth() -> None:
    schedule = Pulls(Backoff(initial=1.0, maximum=8.0), jitter=lambda: 0.999)
    schedule.want(A[0], IMAGE, 100, now=0.0)
    schedule.due(0.0)
    failed = schedule.finished(A[0], RegistryUnreachable("x"), 0.0)
    assert failed is not None and 1.0 < failed.next_try < 1.2


def test_at_most_parallel_pulls_run_and_a_busy_schedule_sets_no_deadline() -> None:
    schedule = pulls(parallel=2)
    for digest, _ in (A, B, C):
        schedule.want(digest, IMAGE, 100, now=0.0)

    assert [p.digest for p in schedule.due(0.0)] == [A[0], B[0]]
    assert schedule.due(0.0) == []
    assert schedule.next_deadline() is None  # C is due, but no slot: no busy wake-ups

    schedule.finished(A[0], None, 0.1)
    assert schedule.next_deadline() == 0.0
    assert [p.digest for p in schedule.due(0.1)] == [C[0]]


def test_a_pull_dropped_while_running_reports_nothing() -> None:
    schedule = pulls()
    schedule.want(A[0], IMAGE, 100, now=0.0)
    schedule.due(0.0)
    schedule.drop(A[0])
    assert schedule.finished(A[0], None, 1.0) is None
    assert schedule.finished(A[0], RegistryUnreachable("x"), 1.0) is None


def test_a_waiting_pull_wanted_from_another_image_is_tried_at_once() -> None:
    schedule = pulls()
    schedule.want(A[0], IMAGE, 100, now=0.0)
    schedule.due(0.0)
    schedule.finished(A[0], ArtifactNotFound("not found"), 0.0)

    other = "127.0.0.1:5000/team/other@sha256:" + "cd" * 32
    assert schedule.want(A[0], other, 100, now=1.0) is None
    (pull,) = schedule.due(1.0)
    assert pull.image == other


@pytest.mark.parametrize(
    ("image", "registry", "repository"),
    [
        ("127.0.0.1:5000/team/app@sha256:" + "ab" * 32, "127.0.0.1:5000", "team/app"),
        ("ghcr.io/acme/hello:1.0", "ghcr.io", "acme/hello"),
        ("localhost/app", "localhost", "app"),
    ],
)
def test_parse_image(image: str, registry: str, repository: str) -> None:
    assert parse_image(image) == Repository(registry, repository)


@pytest.mark.parametrize("image", ["app:1", "UPPER.io/App", "", "ghcr.io/"])
def test_parse_image_refuses_what_it_cannot_pull(image: str) -> None:
    with pytest.raises(InvalidImage):
        parse_image(image)
