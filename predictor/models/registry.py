"""Model registry (SQLAlchemy: PostgreSQL in production, SQLite embedded) and verified artifacts.

A version row records its artifact URI, training-data cutoff, metrics, status and timestamps. Statuses:
``candidate`` → ``production`` (then ``retired`` when replaced) or ``rejected`` (with the reason).

Promotion is one transaction around a compare-and-swap on the ``model_pointers`` row of the model
name: it succeeds only if production is still the version the candidate was compared against. Two
concurrent retrains therefore cannot both promote — the database's row lock serialises them and the
loser sees a changed pointer — and a crash before commit leaves production as it was.

Artifacts are a directory (local path or any fsspec URI) of files plus ``manifest.json`` with each
file's SHA-256; :func:`open_artifact` verifies every checksum before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import sqlalchemy as sa
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

STATUSES = ("candidate", "production", "rejected", "retired")
MANIFEST = "manifest.json"
HASH_CHUNK = 8 << 20  # bytes read per step while verifying a file

metadata = sa.MetaData()
versions_table = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("artifact_uri", sa.Text, nullable=False),
    sa.Column("data_cutoff", sa.DateTime(timezone=True), nullable=True),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("parent_version", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    sa.CheckConstraint(f"status IN {STATUSES}", name="ck_model_versions_status"),
)
pointers_table = sa.Table(
    "model_pointers",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("production_version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


class PromotionConflict(RuntimeError):
    """Production changed since the candidate was evaluated against it."""


class ArtifactError(RuntimeError):
    """An artifact is missing files or a checksum does not match its manifest."""


@dataclass(frozen=True)
class ModelVersion:
    id: int
    name: str
    version: int
    artifact_uri: str
    data_cutoff: datetime | None
    metrics: dict
    status: str
    reason: str | None
    parent_version: int | None
    created_at: datetime
    updated_at: datetime
    promoted_at: datetime | None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class ModelRegistry:
    def __init__(self, url: str | sa.Engine):
        self.engine = sa.create_engine(url) if isinstance(url, str) else url
        metadata.create_all(self.engine)

    def _row(self, row) -> ModelVersion:
        values = dict(row._mapping)
        for key in ("data_cutoff", "created_at", "updated_at", "promoted_at"):
            values[key] = _utc(values[key])
        return ModelVersion(**values)

    def register(
        self,
        name: str,
        artifact_uri: str,
        data_cutoff: datetime | None,
        metrics: dict,
        parent_version: int | None = None,
    ) -> ModelVersion:
        """A new ``candidate`` version numbered one above the highest so far (retried on a race)."""
        for _ in range(5):
            try:
                with self.engine.begin() as conn:
                    top = conn.execute(
                        sa.select(sa.func.max(versions_table.c.version)).where(versions_table.c.name == name)
                    ).scalar()
                    now = _now()
                    new_id = conn.execute(
                        versions_table.insert().values(
                            name=name,
                            version=(top or 0) + 1,
                            artifact_uri=artifact_uri,
                            data_cutoff=data_cutoff,
                            metrics=metrics,
                            status="candidate",
                            parent_version=parent_version,
                            created_at=now,
                            updated_at=now,
                        )
                    ).inserted_primary_key[0]
                return self.get(new_id)
            except sa.exc.IntegrityError:
                continue  # another process took that version number
        raise RuntimeError(f"could not allocate a version number for {name!r}")

    def get(self, version_id: int) -> ModelVersion:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(versions_table).where(versions_table.c.id == version_id)).first()
        if row is None:
            raise KeyError(f"no model version with id {version_id}")
        return self._row(row)

    def versions(self, name: str) -> list[ModelVersion]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(versions_table)
                .where(versions_table.c.name == name)
                .order_by(versions_table.c.version)
            ).all()
        return [self._row(r) for r in rows]

    def production(self, name: str) -> ModelVersion | None:
        with self.engine.connect() as conn:
            pointer = conn.execute(
                sa.select(pointers_table.c.production_version).where(pointers_table.c.name == name)
            ).scalar()
        return self.get(pointer) if pointer is not None else None

    def promote(self, version_id: int, expected_production: int | None) -> ModelVersion:
        """Make ``version_id`` production if production is still ``expected_production`` (None: none yet).

        Raises :class:`PromotionConflict` otherwise; nothing changes then.
        """
        candidate = self.get(version_id)
        if candidate.status != "candidate":
            raise ValueError(
                f"version {candidate.version} of {candidate.name} is {candidate.status}, not a candidate"
            )
        now = _now()
        with self.engine.begin() as conn:
            if expected_production is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            pointers_table.insert().values(
                                name=candidate.name, production_version=version_id, updated_at=now
                            )
                        )
                except sa.exc.IntegrityError as exc:
                    raise PromotionConflict(f"{candidate.name} already has a production version") from exc
            else:
                swapped = conn.execute(
                    pointers_table.update()
                    .where(pointers_table.c.name == candidate.name)
                    .where(pointers_table.c.production_version == expected_production)
                    .values(production_version=version_id, updated_at=now)
                ).rowcount
                if swapped != 1:
                    raise PromotionConflict(
                        f"production of {candidate.name} is no longer version id {expected_production}"
                    )
                conn.execute(
                    versions_table.update()
                    .where(versions_table.c.id == expected_production)
                    .values(status="retired", updated_at=now)
                )
            conn.execute(
                versions_table.update()
                .where(versions_table.c.id == version_id)
                .values(status="production", promoted_at=now, updated_at=now)
            )
        log.info("promoted %s version %d to production", candidate.name, candidate.version)
        return self.get(version_id)

    def reject(self, version_id: int, reason: str) -> ModelVersion:
        with self.engine.begin() as conn:
            conn.execute(
                versions_table.update()
                .where(versions_table.c.id == version_id)
                .where(versions_table.c.status == "candidate")
                .values(status="rejected", reason=reason, updated_at=_now())
            )
        return self.get(version_id)


# --- artifacts -----------------------------------------------------------------------------------------
def write_artifact(uri: str, files: dict[str, bytes], metadata: dict | None = None) -> str:
    """Write ``files`` under ``uri`` (directory), then the manifest last: an artifact without a
    manifest is incomplete and never loads."""
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    entries = {}
    for name, payload in files.items():
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(payload)
        entries[name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    manifest = {"files": entries, "metadata": metadata or {}, "created_at": _now().isoformat()}
    with fs.open(f"{root}/{MANIFEST}", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return uri


def open_artifact(uri: str, local_paths: bool = False) -> tuple[dict[str, bytes | Path], dict]:
    """Read and verify an artifact: ``(files, metadata)``. Raises :class:`ArtifactError` on any mismatch.

    ``local_paths``: files of an artifact on the local filesystem (a mounted volume) come back as their
    verified paths, hashed in chunks and never held in memory, so that the loader can memory-map them;
    other filesystems still return bytes."""
    fs, root = fsspec.core.url_to_fs(uri)
    local = local_paths and isinstance(fs, LocalFileSystem)
    try:
        with fs.open(f"{root}/{MANIFEST}", "r") as f:
            manifest = json.load(f)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri}: no {MANIFEST} (incomplete or not an artifact)") from exc
    files = {}
    for name, entry in manifest["files"].items():
        digest, payload = hashlib.sha256(), b""
        try:
            with fs.open(f"{root}/{name}", "rb") as f:
                if local:  # hashed as it streams by; the loader maps the file itself
                    while chunk := f.read(HASH_CHUNK):
                        digest.update(chunk)
                else:
                    payload = f.read()
                    digest.update(payload)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{uri}: {name} is listed in the manifest but missing") from exc
        if digest.hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{uri}: checksum mismatch for {name}")
        files[name] = Path(root) / name if local else payload
    return files, manifest.get("metadata", {})
