"""Write feature tables to the offline store the active profile uses.

* embedded: one Parquet file per table under ``$RECSYS_HOME/offline`` (Feast ``FileSource``)
* production: one PostgreSQL table per table (Feast ``PostgreSQLSource``), loaded with COPY
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from predictor.config import Profile, Settings
from predictor.features.batch import FeatureTables
from predictor.features.schema import VIEWS

log = logging.getLogger(__name__)

_TS = sa.DateTime(timezone=True)
_SQL_TYPES = {
    "int64": sa.BigInteger,
    "float32": sa.REAL,
    "int64_list": lambda: postgresql.ARRAY(sa.BigInteger()),
    "float32_list": lambda: postgresql.ARRAY(sa.REAL()),
}
# each offline table: the view's join key, event_timestamp, the schema's columns, created
_COLUMNS: dict[str, list[tuple[str, sa.types.TypeEngine]]] = {
    name: [
        (view.join_key, sa.BigInteger()),
        ("event_timestamp", _TS),
        *((c.name, _SQL_TYPES[c.kind]()) for c in view.columns),
        ("created", _TS),
    ]
    for name, view in VIEWS.items()
}


def postgres_table(name: str, metadata: sa.MetaData | None = None) -> sa.Table:
    entity = _COLUMNS[name][0][0]
    return sa.Table(
        name,
        metadata or sa.MetaData(),
        *(sa.Column(col, typ, nullable=False) for col, typ in _COLUMNS[name]),
        sa.Index(f"ix_{name}_{entity}_time", entity, "event_timestamp"),
    )


def write_offline(tables: FeatureTables, settings: Settings, mode: str = "replace") -> dict[str, int]:
    """Write all feature tables; ``mode`` is ``replace`` or ``append``. Returns rows written per table."""
    if mode not in ("replace", "append"):
        raise ValueError(f"mode must be 'replace' or 'append', got {mode!r}")
    written = {}
    for name, frame in tables.as_dict().items():
        if settings.profile is Profile.production:
            _write_postgres(name, frame, settings.postgres_url, mode)
        else:
            _write_parquet(name, frame, settings, mode)
        written[name] = len(frame)
    log.info("offline store (%s): wrote %s", settings.profile.value, written)
    return written


def read_offline(name: str, settings: Settings) -> pd.DataFrame:
    """A whole offline feature table, as written (for tests and inspection)."""
    if settings.profile is Profile.production:
        engine = sa.create_engine(settings.postgres_url)
        with engine.connect() as conn:
            frame = pd.read_sql(sa.select(postgres_table(name)), conn)
        engine.dispose()
        return frame
    return pd.read_parquet(settings.offline_dir / f"{name}.parquet")


def _write_parquet(name: str, frame: pd.DataFrame, settings: Settings, mode: str) -> None:
    path = settings.offline_dir / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "append" and path.exists():
        frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)  # atomic: a reader (feast materialize) never sees half a file


def _pg_array(values) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def _write_postgres(name: str, frame: pd.DataFrame, url: str, mode: str) -> None:
    engine = sa.create_engine(url)
    table = postgres_table(name)
    csv = frame[[c for c, _ in _COLUMNS[name]]].copy()
    for col, typ in _COLUMNS[name]:
        if isinstance(typ, postgresql.ARRAY):
            csv[col] = [_pg_array(np.asarray(v).tolist()) for v in csv[col]]
        elif isinstance(typ, sa.DateTime):
            csv[col] = pd.to_datetime(csv[col], utc=True).dt.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    buf = io.StringIO()
    csv.to_csv(buf, index=False, header=False)
    with engine.begin() as conn:
        if mode == "replace":
            table.drop(conn, checkfirst=True)
        table.create(conn, checkfirst=True)
        with (
            conn.connection.driver_connection.cursor() as cur,
            cur.copy(
                f"COPY {name} ({', '.join(c for c, _ in _COLUMNS[name])}) FROM STDIN WITH (FORMAT csv)"
            ) as cp,
        ):
            cp.write(buf.getvalue())
    engine.dispose()
