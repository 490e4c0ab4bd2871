"""Read Feast's Redis online-store layout directly: one pipelined round trip, no registry lookups.

Feast stores one Redis hash per entity key (``serialize_entity_key(key) + project``) whose fields are
``mmh3("<view>:<feature>")`` → serialized ``ValueProto`` and ``_ts:<view>`` → ``Timestamp``.
:class:`RawRedisReader` builds those keys once per request and sends every HMGET in one pipeline.
It is the floor that ``bench/features.py`` compares ``get_online_features`` against, and the
predictor's hot path may use it where a test shows both return the same values
(``tests/test_feature_store.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import redis
import redis.asyncio
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

from predictor.config import Settings


class _FeastRedisLayout:
    """Keys, fields and decoding of Feast's Redis layout; the clients below only differ in transport."""

    def __init__(self, store: FeatureStore):
        if store.config.online_store.type != "redis":
            raise ValueError(
                f"RawRedisReader needs the Redis online store, not {store.config.online_store.type!r}"
            )
        self.project = store.project.encode()
        self.version = store.config.entity_key_serialization_version
        self._fields: dict[tuple[str, ...], list[bytes]] = {}
        self._frames: dict[str, tuple[bytes, bytes] | bool] = {}  # join key → bytes around the int64 value

    def entity_key(self, join_key: str, value: int) -> bytes:
        frame = self._frames.get(join_key)
        if frame is None:
            frame = self._frames[join_key] = self._int64_frame(join_key)
        if frame is False:
            return self._feast_key(join_key, value)
        return frame[0] + struct.pack("<q", int(value)) + frame[1]

    def _feast_key(self, join_key: str, value: int) -> bytes:
        proto = EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=int(value))])
        return serialize_entity_key(proto, entity_key_serialization_version=self.version) + self.project

    def _int64_frame(self, join_key: str) -> tuple[bytes, bytes] | bool:
        """Feast's key of one int64 entity is fixed bytes around the value's 8 little-endian bytes: found
        once from Feast's own serialisation and checked on sample values, so that keys for a whole catalog
        cost a ``struct.pack`` each (Feast's serialiser was half the time of reading every item's
        features at start-up). False where the layout is not that, and Feast's serialiser is used."""
        probe = self._feast_key(join_key, 0)
        at = probe.find(struct.pack("<q", 0))
        while at >= 0:
            frame = (probe[:at], probe[at + 8 :])
            if all(
                frame[0] + struct.pack("<q", v) + frame[1] == self._feast_key(join_key, v)
                for v in (0, 1, -1, 255, 2**40 + 7, -(2**62))
            ):
                return frame
            at = probe.find(struct.pack("<q", 0), at + 1)
        return False

    @staticmethod
    def fields(features: Sequence[str]) -> list[bytes]:
        """Hash fields of ``view:feature`` references."""
        return [_mmh3(ref) for ref in features]

    def _queue(self, pipe, requests) -> list[tuple[int, list[str]]]:
        shapes = []
        for join_key, ids, features in requests:
            key = tuple(features)
            if key not in self._fields:
                self._fields[key] = self.fields(features)
            fields = self._fields[key]
            for value in ids:
                pipe.hmget(self.entity_key(join_key, value), fields)
            shapes.append((len(ids), [f.split(":", 1)[1] for f in features]))
        return shapes

    @staticmethod
    def _unpack(shapes, replies) -> list[list[dict]]:
        out, at = [], 0
        for count, names in shapes:
            group = []
            for reply in replies[at : at + count]:
                group.append({name: _decode(raw) for name, raw in zip(names, reply)})
            out.append(group)
            at += count
        return out


def _connection_kwargs(settings: Settings, timeout: float) -> dict:
    # what Feast passes redis-py from the same connection string (Settings.redis_connection), plus deadlines
    kwargs: dict = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    if settings.redis_password:
        kwargs["password"] = settings.redis_password
    if settings.redis_tls:
        kwargs["ssl"] = True
        if settings.redis_ca_file:
            kwargs["ssl_ca_certs"] = str(settings.redis_ca_file)
    return kwargs


def redis_client(settings: Settings, timeout: float = 5.0):
    """A blocking client for the settings' Redis: plain, Cluster or Sentinel, with AUTH and TLS, the way
    Feast's Redis online store connects (``RedisOnlineStore._get_client``).

    ``timeout`` bounds connecting and each reply: a Redis that accepts connections but never answers must
    not hang the caller.
    """
    kwargs = _connection_kwargs(settings, timeout)
    nodes = settings.redis_node_list
    if settings.redis_type == "redis_cluster":
        from redis.cluster import ClusterNode, RedisCluster

        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **kwargs)
    if settings.redis_type == "redis_sentinel":
        from redis.sentinel import Sentinel

        return Sentinel(nodes, **kwargs).master_for(
            settings.redis_sentinel_master, db=settings.redis_db, **kwargs
        )
    host, port = nodes[0]
    return redis.Redis(host=host, port=port, db=settings.redis_db, **kwargs)


def async_redis_client(settings: Settings, timeout: float, max_connections: int):
    """:func:`redis_client` on ``redis.asyncio``."""
    kwargs = _connection_kwargs(settings, timeout)
    nodes = settings.redis_node_list
    if settings.redis_type == "redis_cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], max_connections=max_connections, **kwargs
        )
    if settings.redis_type == "redis_sentinel":
        from redis.asyncio.sentinel import Sentinel

        return Sentinel(nodes, **kwargs).master_for(
            settings.redis_sentinel_master, db=settings.redis_db, max_connections=max_connections, **kwargs
        )
    host, port = nodes[0]
    return redis.asyncio.Redis(
        host=host, port=port, db=settings.redis_db, max_connections=max_connections, **kwargs
    )


class RawRedisReader(_FeastRedisLayout):
    """Pipelined HMGETs of named features for entities of one join key (blocking client)."""

    def __init__(self, store: FeatureStore, settings: Settings, timeout: float = 5.0):
        super().__init__(store)
        self.client = redis_client(settings, timeout)

    def read(self, requests: Sequence[tuple[str, Sequence[int], Sequence[str]]]) -> list[list[dict]]:
        """One round trip for several ``(join_key, ids, features)`` groups.

        Returns, per group and per id, ``{feature_name: python value}`` (``None`` where missing).
        """
        pipe = self.client.pipeline(transaction=False)
        shapes = self._queue(pipe, requests)
        return self._unpack(shapes, pipe.execute())

    def close(self) -> None:
        self.client.close()


class AsyncRawRedisReader(_FeastRedisLayout):
    """The same reads on ``redis.asyncio``: what the predictor awaits on its event loop.

    ``timeout`` bounds connecting and each reply, so an unreachable or stalled Redis fails fast and the
    predictor can fall back within its latency budget.
    """

    def __init__(
        self, store: FeatureStore, settings: Settings, timeout: float = 0.05, max_connections: int = 64
    ):
        super().__init__(store)
        self.client = async_redis_client(settings, timeout, max_connections)

    async def read(self, requests: Sequence[tuple[str, Sequence[int], Sequence[str]]]) -> list[list[dict]]:
        pipe = self.client.pipeline(transaction=False)
        shapes = self._queue(pipe, requests)
        return self._unpack(shapes, await pipe.execute())

    async def close(self) -> None:
        await self.client.aclose()


# ValueProto fields whose Python value Feast's ``feast_value_type_to_python_type`` returns as they are
# (scalars) or as a plain list (lists): decoded here without its chain of type checks, the bulk of the time
# when a replica reads a whole catalog's item features at start-up; every other type goes through Feast
_PLAIN_SCALARS = frozenset(
    {"int32_val", "int64_val", "float_val", "double_val", "bool_val", "string_val", "bytes_val"}
)
_PLAIN_LISTS = frozenset(
    {
        "int32_list_val",
        "int64_list_val",
        "float_list_val",
        "double_list_val",
        "bool_list_val",
        "string_list_val",
        "bytes_list_val",
    }
)


def _decode(raw: bytes | None):
    if raw is None:
        return None
    value = Value.FromString(raw)
    kind = value.WhichOneof("val")
    if kind in _PLAIN_SCALARS:
        return getattr(value, kind)
    if kind in _PLAIN_LISTS:
        return list(getattr(value, kind).val)
    return feast_value_type_to_python_type(value)
