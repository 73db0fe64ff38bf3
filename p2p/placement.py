"""Where a chunk lives: rendezvous (highest-random-weight) hashing.

Every node ranks the members for a chunk by ``weight(member, digest)`` and
agrees on the order without talking to anyone: the first is the chunk's home.
When a member leaves, only the chunks it was home for move (each to its own
next candidate), so a membership change reshuffles ``1/N`` of the chunks, not
all of them; homes are spread evenly, so each of N nodes is home for about
``1/N`` of a model.

The weight is xxh3-64 of the member key and the digest: placement needs a
good spread, not secrecy (it is public anyway, every node computes it), and
the digest is already uniformly random.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

__all__ = ["rank", "weight"]


def weight(member: str, digest: bytes) -> int:
    return xxhash.xxh3_64_intdigest(member.encode() + b"\0" + digest)


def rank(members: Iterable[str], digest: bytes) -> list[str]:
    """``members`` ordered by preference for ``digest`` (ties, impossible in practice, by key)."""
    return sorted(members, key=lambda m: (-weight(m, digest), m))
