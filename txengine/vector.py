"""Version vectors: per partition, ``{origin: highest contiguous seq}``.

Each origin numbers its revisions per partition 1, 2, 3, ... (``seq``), and a
revision is only recorded once its parents are, so what a peer holds of one
origin is almost always a prefix: one integer per origin says it. Holes
(a later seq held without an earlier one) only make the other side send a
little more; they never lose a revision.
"""

from __future__ import annotations

from collections import defaultdict

Vector = dict[str, int]
"""``{origin: highest contiguous seq}`` of one partition."""


class SeqIndex:
    """Which ``seq`` of each (partition, origin) this peer holds, and under which id."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        self._contiguous: dict[tuple[str, str], int] = defaultdict(int)
        self._max: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, partition: str, origin: str, seq: int, rev_id: str) -> None:
        """Record that ``rev_id`` holds the slot (partition, origin, seq)."""
        key = (partition, origin)
        ids = self._ids[key]
        ids[seq] = rev_id
        if seq > self._max[key]:
            self._max[key] = seq
        top = self._contiguous[key]
        if seq == top + 1:
            while top + 1 in ids:
                top += 1
            self._contiguous[key] = top

    def discard(self, partition: str, origin: str, seq: int) -> None:
        """Forget a slot (a revision re-issued under a new epoch)."""
        key = (partition, origin)
        self._ids[key].pop(seq, None)
        self._max[key] = max(self._ids[key], default=0)
        if seq <= self._contiguous[key]:
            self._contiguous[key] = seq - 1

    def raise_floor(self, partition: str, origin: str, seq: int) -> None:
        """Count seqs 1..``seq`` as held without their ids (a checkpoint's vector)."""
        key = (partition, origin)
        if seq > self._contiguous[key]:
            ids = self._ids[key]
            while seq + 1 in ids:
                seq += 1
            self._contiguous[key] = seq
        self._max[key] = max(self._max[key], seq)

    def origins(self, partition: str) -> list[str]:
        """Return the origins of which this partition holds something."""
        return sorted({o for (p, o) in self._contiguous if p == partition}
                      | {o for (p, o), ids in self._ids.items() if p == partition and ids})

    def vector(self, partition: str) -> Vector:
        """Return this partition's version vector."""
        return {o: top for (p, o), top in self._contiguous.items() if p == partition and top}

    def partitions(self) -> set[str]:
        return {p for (p, _o), ids in self._ids.items() if ids} | {
            p for (p, _o), top in self._contiguous.items() if top}

    def after(self, partition: str, vector: Vector) -> list[str]:
        """Return the ids of this partition above ``vector`` (what its owner lacks)."""
        out = []
        for (p, origin), ids in self._ids.items():
            if p != partition or not ids:
                continue
            floor = vector.get(origin, 0)
            top = self._max[(p, origin)]
            out += [ids[s] for s in range(floor + 1, top + 1) if s in ids]
        return out

    def highest(self, partition: str, origin: str) -> int:
        """Return the highest seq held of one origin in one partition (0 when none)."""
        return self._max.get((partition, origin), 0)

    def get(self, partition: str, origin: str, seq: int) -> str | None:
        return self._ids.get((partition, origin), {}).get(seq)
