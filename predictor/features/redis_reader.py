"""Read Feast's Redis online-store layout directly: one pipelined round trip, no registry lookups.

Feast stores one Redis hash per entity key (``serialize_entity_key(key) + project``) whose fields are
``mmh3("<view>:<feature>")`` → serialized ``ValueProto`` and ``_ts:<view>`` → ``Timestamp``.
:class:`RawRedisReader` builds those keys once per request and sends every HMGET in one pipeline.
It is the floor that ``bench/features.py`` compares ``get_online_features`` against, and the
predictor's hot path may use it where a test shows both return the same values
(``tests/test_feature_store.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

from predictor.config import Settings


class RawRedisReader:
    """Pipelined HMGETs of named features for entities of one join key."""

    def __init__(self, store: FeatureStore, settings: Settings):
        if store.config.online_store.type != "redis":
            raise ValueError(f"RawRedisReader needs the Redis online store, not {store.config.online_store.type!r}")
        self.project = store.project.encode()
        self.version = store.config.entity_key_serialization_version
        self.client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db)

    def entity_key(self, join_key: str, value: int) -> bytes:
        proto = EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=int(value))])
        return serialize_entity_key(proto, entity_key_serialization_version=self.version) + self.project

    @staticmethod
    def fields(features: Sequence[str]) -> list[bytes]:
        """Hash fields of ``view:feature`` references."""
        return [_mmh3(ref) for ref in features]

    def read(self, requests: Sequence[tuple[str, Sequence[int], Sequence[str]]]) -> list[list[dict]]:
        """One round trip for several ``(join_key, ids, features)`` groups.

        Returns, per group and per id, ``{feature_name: python value}`` (``None`` where missing).
        """
        pipe = self.client.pipeline(transaction=False)
        shapes = []
        for join_key, ids, features in requests:
            fields = self.fields(features)
            for value in ids:
                pipe.hmget(self.entity_key(join_key, value), fields)
            shapes.append((len(ids), [f.split(":", 1)[1] for f in features]))
        replies = pipe.execute()
        out, at = [], 0
        for count, names in shapes:
            group = []
            for reply in replies[at : at + count]:
                group.append({name: _decode(raw) for name, raw in zip(names, reply)})
            out.append(group)
            at += count
        return out

    def close(self) -> None:
        self.client.close()


def _decode(raw: bytes | None):
    if raw is None:
        return None
    value = Value()
    value.ParseFromString(raw)
    return feast_value_type_to_python_type(value)
