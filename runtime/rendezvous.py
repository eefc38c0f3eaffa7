"""Rendezvous (highest random weight) hashing: which instance should hold a set of keys.

Every instance gets a score per key from a hash of (key, instance); a request's instances are
ordered by their summed scores over the request's keys. Each caller computes the same order
with no coordination, a repeated key goes to the same instance, and when an instance joins or
leaves only the keys it wins (or won) move: the others' scores do not change.
"""

import hashlib
from collections.abc import Iterable, Sequence

_SCALE = float(1 << 64)


def score(key: str, instance: str) -> float:
    """A uniform pseudo-random weight in [0, 1) for `key` on `instance`."""
    digest = hashlib.blake2b(f"{key}\0{instance}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _SCALE


def rendezvous_order(keys: Sequence[str], instances: Iterable[str]) -> list[str]:
    """`instances`, the preferred one for `keys` first (instance id breaks ties)."""
    order = list(instances)
    if len(order) < 2:  # nothing to weigh
        return order
    return sorted(order, key=lambda i: (-sum(score(k, i) for k in keys), i))
