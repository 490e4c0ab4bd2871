"""Model registry and artifacts on SQLite and PostgreSQL: promote, reject, concurrent promotion, checksums."""

import threading
from datetime import datetime, timezone

import pytest

from predictor.models.registry import (
    ArtifactError,
    ModelRegistry,
    PromotionConflict,
    open_artifact,
    write_artifact,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def registry(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{request.getfixturevalue('pg_database')}"
    reg = ModelRegistry(url)
    yield reg
    with reg.engine.begin() as conn:  # the PostgreSQL database is shared by the session
        conn.exec_driver_sql("DELETE FROM model_pointers WHERE name LIKE 'test_%%'")
        conn.exec_driver_sql("DELETE FROM model_versions WHERE name LIKE 'test_%%'")
    reg.engine.dispose()


CUTOFF = datetime(2026, 3, 1, tzinfo=timezone.utc)


def test_register_promote_retire(registry):
    v1 = registry.register("test_m", "file:///a", CUTOFF, {"ndcg@10": 0.1})
    assert (v1.version, v1.status, v1.data_cutoff) == (1, "candidate", CUTOFF)
    assert registry.production("test_m") is None
    registry.promote(v1.id, None)
    v2 = registry.register("test_m", "file:///b", CUTOFF, {"ndcg@10": 0.2}, parent_version=1)
    promoted = registry.promote(v2.id, v1.id)
    assert promoted.status == "production" and promoted.promoted_at is not None
    assert registry.get(v1.id).status == "retired"
    assert registry.production("test_m").id == v2.id
    assert [v.version for v in registry.versions("test_m")] == [1, 2]


def test_reject_records_reason_and_keeps_production(registry):
    v1 = registry.promote(registry.register("test_r", "file:///a", CUTOFF, {}).id, None)
    v2 = registry.register("test_r", "file:///b", CUTOFF, {})
    rejected = registry.reject(v2.id, "worse by 0.02")
    assert (rejected.status, rejected.reason) == ("rejected", "worse by 0.02")
    assert registry.production("test_r").id == v1.id
    with pytest.raises(ValueError, match="is rejected, not a candidate"):
        registry.promote(v2.id, v1.id)


def test_stale_promotion_conflicts(registry):
    v1 = registry.promote(registry.register("test_s", "file:///a", CUTOFF, {}).id, None)
    a = registry.register("test_s", "file:///b", CUTOFF, {})
    b = registry.register("test_s", "file:///c", CUTOFF, {})
    registry.promote(a.id, v1.id)
    with pytest.raises(PromotionConflict, match="no longer version id"):
        registry.promote(b.id, v1.id)  # b was compared against v1, which is gone
    assert registry.production("test_s").id == a.id
    assert registry.get(b.id).status == "candidate"


def test_concurrent_promotions_only_one_wins(registry):
    v1 = registry.promote(registry.register("test_c", "file:///a", CUTOFF, {}).id, None)
    candidates = [registry.register("test_c", f"file:///{i}", CUTOFF, {}) for i in range(6)]
    barrier = threading.Barrier(len(candidates))
    outcomes = []

    def attempt(version):
        barrier.wait()
        try:
            registry.promote(version.id, v1.id)
            outcomes.append("won")
        except PromotionConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=attempt, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]
    production = [v for v in registry.versions("test_c") if v.status == "production"]
    assert len(production) == 1


def test_artifact_checksums(tmp_path):
    uri = str(tmp_path / "art")
    write_artifact(uri, {"a.bin": b"hello", "b.json": b"{}"}, {"kind": "test"})
    files, meta = open_artifact(uri)
    assert files == {"a.bin": b"hello", "b.json": b"{}"} and meta == {"kind": "test"}
    (tmp_path / "art" / "a.bin").write_bytes(b"hellO")
    with pytest.raises(ArtifactError, match="checksum mismatch for a.bin"):
        open_artifact(uri)
    (tmp_path / "art" / "a.bin").write_bytes(b"hello")
    (tmp_path / "art" / "b.json").unlink()
    with pytest.raises(ArtifactError, match="b.json is listed in the manifest but missing"):
        open_artifact(uri)


def test_artifact_without_manifest_is_incomplete(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights.pt").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        open_artifact(str(tmp_path / "half"))


def test_artifact_on_fsspec_memory_filesystem():
    write_artifact("memory://models/x", {"w": b"123"})
    assert open_artifact("memory://models/x")[0] == {"w": b"123"}
