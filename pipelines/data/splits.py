"""The held-out split, as a pure function of a record's content (one rule for every task)."""

from __future__ import annotations

import hashlib


def held_out(fields: tuple[str, ...], fraction: float, seed: int) -> bool:
    """A seeded 64-bit hash of the record's identifying fields, below `fraction`. The same record is
    held out at any scale, in any file format and partitioning, on every machine; exact duplicates
    share a split (no copy of a held-out record is trained on). The held-out share is `fraction`
    in expectation, not exactly."""
    if fraction <= 0:
        return False
    # Length-prefixed fields: unambiguous whatever the text holds.
    content = "".join(f"{len(f)}:{f}" for f in fields)
    h = hashlib.blake2b(content.encode(), digest_size=8, salt=seed.to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < fraction * 2**64
