"""The server's API key cache (`corral.server.auth.KeyCache`): a key's team comes from
the store once per `KEY_CACHE_SECONDS`, and a revoked key is refused once that passes.
(A revocation through `corral admin` against a live server: tests/test_api.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from corral.errors import Unauthenticated
from corral.server.auth import KeyCache
from corral.store import Store
from corral.store.teams import hash_key


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting_queries(store: Store) -> list[str]:
    """Every SQL statement the store runs from now on."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    sa.event.listen(store._db, "before_cursor_execute", record)
    return seen


def test_a_key_is_looked_up_once_per_ttl_and_a_revocation_ends_it(store: Store) -> None:
    store.create_team("cached")
    key = store.create_api_key("cached")
    clock = Clock()
    cache = KeyCache(ttl=0.5, clock=clock)
    queries = counting_queries(store)
    first = cache.team(store, hash_key(key), key)
    looked_up = len(queries)
    assert first.name == "cached" and looked_up > 0
    for _ in range(100):
        assert cache.team(store, hash_key(key), key) == first
    assert len(queries) == looked_up  # served from memory
    store.revoke_api_key(key)
    clock.now += 0.4
    assert cache.team(store, hash_key(key), key) == first  # within the TTL: remembered
    clock.now += 0.2
    with pytest.raises(Unauthenticated, match="revoked"):
        cache.team(store, hash_key(key), key)


def test_an_unknown_key_is_not_remembered(store: Store) -> None:
    store.create_team("later")
    cache = KeyCache(ttl=60, clock=Clock())
    key = "crl_" + "a" * 32
    with pytest.raises(Unauthenticated):
        cache.team(store, hash_key(key), key)
    # A key created after a miss works at once: the miss was not cached.
    made = store.create_api_key("later")
    assert cache.team(store, hash_key(made), made).name == "later"
