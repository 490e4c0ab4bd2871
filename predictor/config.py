"""Runtime settings, read once from the environment (prefix ``RECSYS_``).

One setting, ``RECSYS_PROFILE``, picks the whole storage layout:

* ``embedded``   – everything under ``RECSYS_HOME``: Feast file registry, Parquet offline store,
  SQLite online store, SQLite event log. Needs no server.
* ``production`` – PostgreSQL (Feast SQL registry, offline store, event log) and Redis (online store).
  Hosts and credentials come from environment variables only.
"""

from __future__ import annotations

import os
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import quote_plus

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO = REPO_ROOT / "feature_repo"


class Profile(str, Enum):
    embedded = "embedded"
    production = "production"


RedisType = Literal["redis", "redis_cluster", "redis_sentinel"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    profile: Profile = Profile.embedded
    home: Path = Field(
        default=Path(".recsys"), description="Local state directory (embedded stores, models)."
    )
    feast_project: str = Field(default="recsys", pattern=r"^[a-z][a-z0-9_]*$")
    feature_repo: Path = FEATURE_REPO

    # production profile: PostgreSQL and Redis
    pg_host: str = "127.0.0.1"
    pg_port: int = 5432
    pg_database: str = "recsys"
    pg_user: str = "postgres"
    pg_password: str = ""
    pg_sslmode: str = "disable"
    pg_sslrootcert: Path | None = Field(
        default=None, description="CA bundle for sslmode verify-ca / verify-full (managed PostgreSQL)."
    )
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    # managed Redis: AUTH (password, ACL user), TLS, Redis Cluster or Sentinel; Feast connects with the same
    redis_type: RedisType = Field(default="redis", description="redis, redis_cluster or redis_sentinel.")
    redis_nodes: str = Field(
        default="",
        description="Cluster or Sentinel nodes, host:port comma-separated; default the host and port.",
    )
    redis_sentinel_master: str = "mymaster"
    redis_username: str = ""
    redis_password: str = ""
    redis_tls: bool = False
    redis_ca_file: Path | None = Field(
        default=None, description="CA bundle that signed the Redis server's cert."
    )

    # the events service's stream (production profile): NATS JetStream
    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server(s), comma-separated.")
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: Path | None = Field(default=None, description="NATS credentials file (JWT and NKey seed).")
    nats_tls_ca: Path | None = Field(
        default=None, description="CA bundle that signed the NATS server's cert."
    )
    events_stream: str = Field(default="RECSYS_EVENTS", pattern=r"^[A-Za-z0-9_-]+$")
    events_subject: str = Field(default="recsys.events", pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    events_consumer: str = Field(default="recsys-events", pattern=r"^[A-Za-z0-9_-]+$")
    events_max_age_days: float = Field(default=7.0, gt=0, description="How long the stream keeps events.")
    events_ack_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Unacknowledged messages of a lost consumer are redelivered after this.",
    )

    # model artifacts: a local path or any fsspec URI (s3://, gs://, ...); default $RECSYS_HOME/models
    artifacts: str | None = None

    # length of the last-N item sequence kept per user, offline and online
    recent_items: int = Field(default=50, ge=1, le=1000)

    @field_validator("redis_password", "redis_username")
    @classmethod
    def _no_separators(cls, value: str) -> str:
        # Feast's Redis connection string is "host:port,key=value,..." with no quoting
        if "," in value:
            raise ValueError("must not contain ',' (Feast's Redis connection string cannot carry it)")
        return value

    @property
    def redis_node_list(self) -> list[tuple[str, int]]:
        if not self.redis_nodes:
            return [(self.redis_host, self.redis_port)]
        nodes = []
        for node in self.redis_nodes.split(","):
            host, _, port = node.strip().rpartition(":")
            nodes.append((host, int(port)))
        return nodes

    @property
    def redis_connection(self) -> str:
        """Feast's ``connection_string`` for these settings (what ``feature_store.yaml`` expands)."""
        parts = [f"{host}:{port}" for host, port in self.redis_node_list]
        if self.redis_type != "redis_cluster":  # cluster nodes have no SELECT
            parts.append(f"db={self.redis_db}")
        if self.redis_username:
            parts.append(f"username={self.redis_username}")
        if self.redis_password:
            parts.append(f"password={self.redis_password}")
        if self.redis_tls:
            parts.append("ssl=true")
            if self.redis_ca_file:
                parts.append(f"ssl_ca_certs={self.redis_ca_file}")
        return ",".join(parts)

    @cached_property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def artifacts_uri(self) -> str:
        return self.artifacts or str(self.home_dir / "models")

    @property
    def offline_dir(self) -> Path:
        """Parquet offline store of the embedded profile."""
        return self.home_dir / "offline"

    @property
    def postgres_url(self) -> str:
        password = f":{quote_plus(self.pg_password)}" if self.pg_password else ""
        return (
            f"postgresql+psycopg://{quote_plus(self.pg_user)}{password}@{self.pg_host}:{self.pg_port}"
            f"/{self.pg_database}?sslmode={self.pg_sslmode}"
            + (f"&sslrootcert={self.pg_sslrootcert}" if self.pg_sslrootcert else "")
        )

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the event log and item catalog (and later the model registry)."""
        if self.profile is Profile.production:
            return self.postgres_url
        return f"sqlite:///{self.home_dir / 'recsys.db'}"

    @property
    def feature_store_yaml(self) -> Path:
        if self.profile is Profile.production:
            return self.feature_repo / "production" / "feature_store.yaml"
        return self.feature_repo / "feature_store.yaml"

    def feast_environment(self) -> dict[str, str]:
        """Variables the feature_store.yaml files and feature definitions expand.

        Feast expands ``${VAR}`` in feature_store.yaml with ``os.path.expandvars`` (no defaults), so
        every variable a profile uses is exported before Feast reads it.
        """
        return {
            "RECSYS_PROFILE": self.profile.value,
            "RECSYS_HOME": str(self.home_dir),
            "RECSYS_FEAST_PROJECT": self.feast_project,
            "RECSYS_PG_HOST": self.pg_host,
            "RECSYS_PG_PORT": str(self.pg_port),
            "RECSYS_PG_DATABASE": self.pg_database,
            "RECSYS_PG_USER": self.pg_user,
            "RECSYS_PG_PASSWORD": self.pg_password,
            "RECSYS_PG_SSLMODE": self.pg_sslmode,
            # empty: libpq's default, as if unset
            "RECSYS_PG_SSLROOTCERT": str(self.pg_sslrootcert) if self.pg_sslrootcert else "",
            "RECSYS_PG_URL": self.postgres_url,
            "RECSYS_REDIS_CONNECTION": self.redis_connection,
            "RECSYS_REDIS_TYPE": self.redis_type,
            "RECSYS_REDIS_SENTINEL_MASTER": self.redis_sentinel_master,
            # child processes (the demo's predictor, benchmarks) build their Settings from these
            "RECSYS_REDIS_HOST": self.redis_host,
            "RECSYS_REDIS_PORT": str(self.redis_port),
            "RECSYS_REDIS_DB": str(self.redis_db),
            "RECSYS_REDIS_NODES": self.redis_nodes,
            "RECSYS_REDIS_USERNAME": self.redis_username,
            "RECSYS_REDIS_PASSWORD": self.redis_password,
            "RECSYS_REDIS_TLS": str(self.redis_tls).lower(),
            **({"RECSYS_REDIS_CA_FILE": str(self.redis_ca_file)} if self.redis_ca_file else {}),
            "RECSYS_RECENT_ITEMS": str(self.recent_items),
            "FEAST_FS_YAML_FILE_PATH": str(self.feature_store_yaml),
        }

    def export_feast_environment(self) -> None:
        os.environ.update(self.feast_environment())
        self.home_dir.mkdir(parents=True, exist_ok=True)
