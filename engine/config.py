"""Tunables of a store and the retention policy of a timeline."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgumentError

MiB = 1 << 20
MAX_PERIOD = 100 * 365 * 24 * 3600.0  # a century


@dataclass(frozen=True)
class Retention:
    """How much history a timeline keeps readable (and branchable).

    An LSN is retained while it is within `period` seconds of now or within
    `lsn_distance` of the head (either suffices). With both None, all history
    is kept. GC never moves the horizon back, and never past the head.
    """

    period: float | None = 7 * 24 * 3600.0
    lsn_distance: int | None = None

    def __post_init__(self) -> None:
        p = self.period
        if p is not None and not (
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= MAX_PERIOD
        ):
            raise InvalidArgumentError(f"retention period must be seconds in [0, {MAX_PERIOD:.0f}], got {p!r}")
        d = self.lsn_distance
        if d is not None and not (type(d) is int and 0 <= d < 2**63):
            raise InvalidArgumentError(f"retention lsn_distance must be an int in [0, 2**63), got {d!r}")


KEEP_ALL = Retention(period=None, lsn_distance=None)


@dataclass(frozen=True)
class StoreConfig:
    # An open in-memory layer is frozen and flushed to a delta layer past this.
    inmemory_layer_bytes: int = 64 * MiB
    # The log starts a new segment past this; segments are deleted once their
    # records are in layer files and a manifest snapshot.
    log_segment_bytes: int = 64 * MiB
    # Checkpoint (flush and snapshot) when the log holds more than this.
    log_checkpoint_bytes: int = 256 * MiB
    # Compaction: merge runs of at least this many small deltas ...
    merge_threshold: int = 8
    # ... into deltas of about this size ("small" is under half of it).
    delta_target_bytes: int = 128 * MiB
    # Write an image for a key partition once this many deltas lie above its
    # newest image, so a read consults at most about this many layers.
    image_threshold: int = 4
    # Keys per image partition (16384 pages of 8 KiB = 128 MiB).
    image_partition_keys: int = 16384
    # Default retention of timelines that do not set their own.
    retention: Retention = Retention()
    # Seconds between passes of the background thread (compaction, and GC of
    # the timelines in use); frozen layers are flushed as soon as they appear.
    background_interval: float = 10.0
    # Seconds between GC passes over every timeline, used or not.
    full_gc_interval: float = 600.0
    # With a remote (engine.remote): checkpoint once the log has taken no
    # write for this long since the last checkpoint, so that the object
    # store's index holds everything and a restore replays no log.
    idle_checkpoint_s: float = 2.0
    # ... but no sooner than this after the last idle checkpoint: a trickle of
    # writes with pauses longer than idle_checkpoint_s would otherwise upload
    # a tiny layer and an index at every pause.
    idle_checkpoint_gap_s: float = 30.0

    def __post_init__(self) -> None:
        for name in (
            "inmemory_layer_bytes", "log_segment_bytes", "log_checkpoint_bytes",
            "merge_threshold", "delta_target_bytes", "image_threshold", "image_partition_keys",
        ):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise InvalidArgumentError(f"StoreConfig.{name} must be a positive int, got {v!r}")
        if not (type(self.idle_checkpoint_s) in (int, float) and 0 < self.idle_checkpoint_s < 86400):
            raise InvalidArgumentError(
                f"StoreConfig.idle_checkpoint_s must be seconds in (0, 86400), got {self.idle_checkpoint_s!r}")
        if not (type(self.idle_checkpoint_gap_s) in (int, float) and 0 <= self.idle_checkpoint_gap_s < 86400):
            raise InvalidArgumentError(
                f"StoreConfig.idle_checkpoint_gap_s must be seconds in [0, 86400), got {self.idle_checkpoint_gap_s!r}")
        if self.merge_threshold < 2:
            raise InvalidArgumentError("StoreConfig.merge_threshold must be at least 2")
