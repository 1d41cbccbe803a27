import hashlib
from pathlib import Path

import pytest

from proplet.artifacts import ArtifactStore, DigestMismatch, digest_hex, sha256_digest

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
