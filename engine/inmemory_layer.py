"""The in-memory layer: a timeline's recent commits, not yet in a layer file.

Commits go to the timeline's *open* in-memory layer (and to the commit log,
which makes them durable). Past `StoreConfig.inmemory_layer_bytes` the open
layer is *frozen* (no more writes) and a new one opened; a frozen layer is
written out as one delta layer file, after which the log no longer needs its
records.

One writer (holding the timeline's write lock) and any number of readers use
a layer concurrently: the writer only appends to per-key version lists, which
readers see whole or not at all under the GIL.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from .values import Version

# A version as kept in memory: (lsn, flags, raw_len, stored, checksum)
MemVersion = tuple[int, int, int, bytes, int]

_OVERHEAD = 96  # rough bytes of bookkeeping per version


class InMemoryLayer:
    __slots__ = ("versions", "size", "times", "lsn_min", "lsn_max", "frozen_at")

    def __init__(self) -> None:
        self.versions: dict[int, list[MemVersion]] = {}
        self.size = 0
        self.times: list[tuple[int, int]] = []  # (lsn, commit time µs) per commit
        self.lsn_min = 0
        self.lsn_max = 0
        # When frozen: the log's last LSN at that moment. Every commit of the
        # timeline up to it is in this layer or an older one.
        self.frozen_at = 0

    def put(self, lsn: int, time_us: int, batch: list[Version]) -> None:
        versions = self.versions
        size = 0
        for key, flags, raw_len, stored, csum in batch:
            v = (lsn, flags, raw_len, stored, csum)
            lst = versions.get(key)
            if lst is None:
                versions[key] = [v]
            else:
                lst.append(v)
            size += len(stored) + _OVERHEAD
        self.size += size
        self.times.append((lsn, time_us))
        if not self.lsn_min:
            self.lsn_min = lsn
        self.lsn_max = lsn

    def find(self, key: int, lsn: int) -> MemVersion | None:
        vs = self.versions.get(key)
        if vs is None:
            return None
        v = vs[-1]
        if v[0] <= lsn:
            return v
        i = bisect.bisect_right(vs, lsn, key=_lsn_of)
        return vs[i - 1] if i else None

    def __len__(self) -> int:
        return len(self.versions)

    def sorted_versions(self) -> Iterator[tuple[int, MemVersion]]:
        """Every (key, version) in (key, LSN) order."""
        for key in sorted(self.versions):
            for v in self.versions[key]:
                yield key, v


def _lsn_of(v: MemVersion) -> int:
    return v[0]
