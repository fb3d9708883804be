"""`strata check`: verify a store end to end.

- every timeline's metadata decodes (the manifest and the log agree);
- every layer file the metadata lists exists with its recorded size, and
  every section and every value in it passes its checksum;
- no layer file sits in a timeline's directory without being listed;
- every timeline reads back, values checksummed, at its head, at its
  horizon, and at the LSN boundaries of its layers in between (at most
  `max_lsns` of them), ancestors included.

It reads everything: minutes for a big store. Problems are collected, not
raised, so one damaged file does not hide the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import CorruptionError, NotFoundError, StrataError
from .layer_file import parse_layer_name

if TYPE_CHECKING:
    from .store import Store
    from .timeline import Timeline


@dataclass
class CheckReport:
    timelines: int = 0
    layers: int = 0
    values: int = 0
    reads: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(store: Store, max_lsns: int = 16) -> CheckReport:
    report = CheckReport()
    for tid in store.timeline_ids():
        report.timelines += 1
        try:
            tl = store.timeline(tid)
        except (CorruptionError, NotFoundError) as e:
            report.problems.append(f"timeline {tid}: {e}")
            continue
        _check_files(store, tl, report)
        _check_reads(tl, report, max_lsns)
    for tid, err in store.damaged().items():
        msg = f"timeline {tid}: {err}"
        if msg not in report.problems:
            report.problems.append(msg)
    return report


def _check_files(store: Store, tl: Timeline, report: CheckReport) -> None:
    layers = list(tl._map.layers)
    listed = {ly.desc.name for ly in layers}
    tdir = os.path.join(store._timelines_dir, tl.id)
    if store.fs.isdir(tdir):
        for name in store.fs.listdir(tdir):
            if parse_layer_name(name) and name not in listed:
                report.problems.append(f"{os.path.join(tdir, name)}: a layer file no timeline lists")
    for ly in layers:
        report.layers += 1
        path = os.path.join(tdir, ly.desc.name)
        try:
            try:
                size = store.fs.file_size(path)
            except FileNotFoundError:
                if ly.fetch is None:
                    raise
                size = ly.desc.file_size  # (not cached here: checked as read from the object store)
            if size != ly.desc.file_size:
                report.problems.append(f"{path}: {size} bytes, the manifest says {ly.desc.file_size}")
                continue
            _ = ly.keys  # the key bitmap section, checksummed on load
            ly.times()
            for _, entry in ly.entries():
                ly.read_stored(entry)
                report.values += 1
        except FileNotFoundError:
            report.problems.append(f"{path}: listed but missing")
        except (CorruptionError, OSError) as e:
            report.problems.append(str(e))


def _check_reads(tl: Timeline, report: CheckReport, max_lsns: int) -> None:
    low, high = tl.horizon, tl.head_lsn
    inner = sorted({ly.desc.lsn_start for ly in tl._map.layers if low < ly.desc.lsn_start < high})
    step = max(1, len(inner) // max(1, max_lsns - 2))
    for lsn in sorted({max(low, tl.branch_lsn), high, *inner[::step]}):
        try:
            for _ in tl.scan(lsn):
                report.reads += 1
        except StrataError as e:
            report.problems.append(f"timeline {tl.id} at LSN {lsn}: {e}")
