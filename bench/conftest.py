"""Benchmarks: every figure is a ratio against a baseline measured in the
same run (the machines are shared and noisy), plus the absolute numbers.

Run with `make bench`. Each benchmark records its figures with `report()`;
the session ends by printing one table and writing it to
`bench/results/latest.md` (and `.json`) for the README's performance section.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import pytest

RESULTS = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class Figure:
    bench: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


_figures: list[Figure] = []


def report(bench: str, name: str, value: float, unit: str, target: str = "", ok: bool | None = None) -> None:
    _figures.append(Figure(bench, name, value, unit, target, ok))


def median_seconds(benchmark) -> float:
    return float(benchmark.stats.stats.median)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _whole_run(config) -> bool:
    """Did this session run every benchmark, as `make bench` does?"""
    if config.option.keyword or config.option.markexpr:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    return any(os.path.abspath(str(a).split("::")[0]) == here for a in config.args)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The figures as a table; a whole run's replace bench/results/latest.md
    (the table the README quotes), a partial run's go to partial.md."""
    if not _figures:
        return
    whole = _whole_run(config)
    how = "with `make bench`" if whole else "with a partial run (`pytest " + " ".join(config.invocation_params.args) + "`)"
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {how}.",
        "",
        "| benchmark | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for f in _figures:
        met = "" if f.ok is None else ("yes" if f.ok else "**no**")
        lines.append(f"| {f.bench} | {f.name} | {_fmt(f.value)} {f.unit} | {f.target} | {met} |")
    table = "\n".join(lines)
    terminalreporter.write_sep("=", "strata figures")
    terminalreporter.write_line(table)
    os.makedirs(RESULTS, exist_ok=True)
    name = "latest" if whole else "partial"
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump([asdict(x) for x in _figures], f, indent=1)
    terminalreporter.write_line(f"written to {os.path.join(RESULTS, name + '.md')}")
