"""The layer map: where a timeline looks for the version of a key at an LSN.

Design overview
---------------
A timeline's data is a stack of layers, each an immutable set of versions
with an LSN range: the open in-memory layer (newest), frozen in-memory layers
waiting to be written, then layer files, newest first (by the end of their
LSN range; an image sorts before a delta that ends at its LSN). A *base*
(the complete images written when a timeline was detached from its ancestor,
at its start LSN) sorts last.

To find (key, lsn) in one timeline, take the first layer, in that order,
whose LSN range starts at or below `lsn` and that holds a version of the key
at or below `lsn`. Layers that cannot hold the key are skipped on their key
bitmap alone. An image layer ends the search for every key in its key range:
if the key is not in it, a *complete* image says the key is absent, a *local*
image says the timeline never wrote the key (at or below the image's LSN) and
the search continues in the base or the ancestor. The union of all layer
bitmaps lets a read skip a timeline's files altogether.

Compaction keeps this short: it merges small deltas and writes images where
keys sit under too many deltas, so a read consults a bounded number of layers
however long the history. See `engine.compaction`.

A `LayerMap` is immutable; a timeline swaps in a new one whenever its layers
change, so readers use whichever map they picked up without locking.
"""

from __future__ import annotations

from pyroaring import BitMap64, FrozenBitMap64

from .errors import CorruptionError
from .inmemory_layer import InMemoryLayer, MemVersion
from .layer_file import Entry, Layer


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISS = _Sentinel("MISS")  # no version in this timeline: ask the ancestor
ABSENT = _Sentinel("ABSENT")  # the key is absent at this LSN: stop

# What locate() finds: (None, MemVersion) from memory, (Layer, Entry) from a file.
Found = tuple[Layer | None, MemVersion | Entry]


def _order(layer: Layer) -> tuple[int, int]:
    return (layer.desc.lsn_end, 1 if layer.is_image else 0)


class LayerMap:
    __slots__ = ("open", "frozen", "layers", "base_at", "start_lsn", "_keys", "_keys_failed")

    def __init__(
        self,
        open_layer: InMemoryLayer,
        frozen: tuple[InMemoryLayer, ...],
        layers: list[Layer] | tuple[Layer, ...],
        start_lsn: int,
    ) -> None:
        self.open = open_layer
        self.frozen = frozen  # newest first
        base = sorted((ly for ly in layers if ly.lsn_start <= start_lsn), key=_order, reverse=True)
        local = sorted((ly for ly in layers if ly.lsn_start > start_lsn), key=_order, reverse=True)
        self.layers = tuple(local + base)
        self.base_at = len(local)
        self.start_lsn = start_lsn
        self._keys: FrozenBitMap64 | None = None
        self._keys_failed = False

    def replace(
        self,
        *,
        open_layer: InMemoryLayer | None = None,
        frozen: tuple[InMemoryLayer, ...] | None = None,
        layers: list[Layer] | tuple[Layer, ...] | None = None,
    ) -> LayerMap:
        m = LayerMap(
            self.open if open_layer is None else open_layer,
            self.frozen if frozen is None else frozen,
            self.layers if layers is None else layers,
            self.start_lsn,
        )
        if layers is None and not self._keys_failed:
            m._keys = self._keys
        return m

    @property
    def has_base(self) -> bool:
        return self.base_at < len(self.layers)

    def file_keys(self) -> FrozenBitMap64 | None:
        """Union of the key bitmaps of all layer files (None if one is damaged)."""
        k = self._keys
        if k is None and not self._keys_failed:
            try:
                k = FrozenBitMap64(BitMap64.union(BitMap64(), *(ly.keys for ly in self.layers)))
            except (CorruptionError, OSError):
                self._keys_failed = True
                return None
            self._keys = k
        return k

    def locate(self, key: int, lsn: int, trace: list[Layer] | None = None) -> Found | _Sentinel:
        """The newest version of `key` at or below `lsn` in this timeline.
        `trace`, if given, collects every layer file whose bitmap was checked."""
        vs = self.open.versions.get(key)
        if vs is not None:
            v = vs[-1]
            if v[0] <= lsn:
                return None, v
            v2 = self.open.find(key, lsn)
            if v2 is not None:
                return None, v2
        for f in self.frozen:
            v2 = f.find(key, lsn)
            if v2 is not None:
                return None, v2
        if not self.layers:
            return MISS
        keys = self._keys if self._keys is not None else self.file_keys()
        if keys is not None and key not in keys:
            return MISS
        layers = self.layers
        i = 0
        n = len(layers)
        while i < n:
            layer = layers[i]
            i += 1
            if layer.lsn_start > lsn:
                continue
            if trace is not None:
                trace.append(layer)
            if key in (layer._keys or layer.keys):
                e = layer.find(key, lsn)
                if e is not None:
                    return layer, e
            elif layer.is_image and layer.key_first <= key <= layer.key_last:
                if layer.complete:
                    return ABSENT
                if i < self.base_at:
                    i = self.base_at  # no local version: only the base can have one
        return MISS

    def all_layers(self) -> tuple[Layer, ...]:
        return self.layers
