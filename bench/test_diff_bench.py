"""What a branch changed, timed against full comparisons (issue: branch
diff), on seeded databases of 100 MB and 1 GB with 10, 1,000 and 100,000
changed rows (spread over the table: the worst case for pages), side by
side in one run:

- strata's page diff (storage only: `strata diff --stat`), the engine's
  part of it alone, and the page and row diff (`strata diff`), both sides
  running (each is checkpointed first, as a diff of a live head is);
- `pg_dump` of both sides through the proxy, then GNU `diff` of the dumps;
- a full-table comparison: both tables streamed with COPY and compared as
  multisets (EXCEPT ALL each way, client side: the two sides are two
  clusters, so one EXCEPT query cannot see both).

The table goes to bench/results/latest.md, the figures to
bench/results/diff.md and a plot to bench/results/diff.png.
Sizes: STRATA_BENCH_DIFF_MB (default 100,1000).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections import Counter

import psycopg
import pytest

from pageserver.compute.postgres import pg_bindir
from pageserver.control.plane import ControlPlane
from tests.pg import Running, pg_available

from .conftest import RESULTS, report
from .test_workflow_bench import ROWS_PER_MB, seed_sql

pytestmark = pytest.mark.skipif(pg_available() is not None, reason=pg_available() or "")
SIZES_MB = [int(x) for x in os.environ.get("STRATA_BENCH_DIFF_MB", "100,1000").split(",")]
CHANGES = [10, 1000, 100_000]

results: dict[tuple[int, int], dict[str, float]] = {}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with Running(str(tmp_path_factory.mktemp("diff-bench"))) as s:
        yield s.cp


def _timed(fn, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _dump_and_diff(uri_a: str, uri_b: str) -> None:
    exe = os.path.join(pg_bindir(), "pg_dump")
    with tempfile.TemporaryDirectory() as d:
        for name, uri in (("a", uri_a), ("b", uri_b)):
            subprocess.run([exe, "-f", os.path.join(d, f"{name}.sql"), uri], check=True)
        subprocess.run(["diff", os.path.join(d, "a.sql"), os.path.join(d, "b.sql")], stdout=subprocess.DEVNULL,
                       check=False)


def _copy_compare(uri_a: str, uri_b: str) -> int:
    def rows(uri: str) -> Counter[bytes]:
        with psycopg.connect(uri) as conn, conn.cursor().copy("COPY items TO STDOUT") as copy:
            return Counter(bytes(line) for line in copy)
    a, b = rows(uri_a), rows(uri_b)
    return sum(((a - b) + (b - a)).values())


@pytest.mark.parametrize("mb", SIZES_MB)
def test_diff_against_full_comparisons(benchmark, served: ControlPlane, mb: int):
    cp = served
    db = cp.create_database(f"d{mb}")
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute(seed_sql(mb))
        conn.execute("vacuum freeze items")  # (hint bits set: the branches' reads change no page)
    cp.suspend(db.name, "main")  # (a clean stop: the branches start from a checkpointed image)
    n = mb * ROWS_PER_MB
    main_uri = cp.uri(f"{db.name}/main")
    for changes in CHANGES:
        changed = min(changes, n)
        step = max(1, n // changed)
        name = f"c{changes}"
        br = cp.create_branch(db.name, name)
        with psycopg.connect(br.uri, autocommit=True) as conn:
            conn.execute(f"update items set pad = 'x' || pad where id % {step} = 0")
        a, b = f"{db.name}/main", f"{db.name}/{name}"
        cp.wake(a)  # (both sides running, as the full comparisons need them)
        fig: dict[str, float] = {}
        out = cp.diff(a, b, rows=False)
        fig["strata page diff, engine part"] = out["pages"]["seconds"]
        fig["strata page diff (--stat)"] = _timed(lambda a=a, b=b: cp.diff(a, b, rows=False), 5)
        if changes == 10:
            benchmark.pedantic(lambda a=a, b=b: cp.diff(a, b), rounds=5)
        full = cp.diff(a, b, max_pages=10**7)
        (t,) = [x for x in full["rows"] if x["table"] == "public.items"]
        assert t["counts"]["modified"] == len(range(step, n + 1, step))  # (what it timed is right)
        fig["strata page and row diff"] = _timed(lambda a=a, b=b: cp.diff(a, b, max_pages=10**7),
                                                 3 if changes < 100_000 else 1)
        slow = 1 if mb >= 1000 else 2
        fig["pg_dump both sides + diff"] = _timed(lambda u=br.uri: _dump_and_diff(main_uri, u), slow)
        fig["full-table comparison (COPY, EXCEPT ALL)"] = _timed(
            lambda u=br.uri: _copy_compare(main_uri, u), slow)
        results[(mb, changes)] = fig
        for k, v in fig.items():
            report(f"diff, {mb} MB, {changes:,} changed rows", k, v * 1e3, "ms")
        fastest_full = min(fig["pg_dump both sides + diff"], fig["full-table comparison (COPY, EXCEPT ALL)"])
        ratio = fastest_full / fig["strata page and row diff"]
        report(f"diff, {mb} MB, {changes:,} changed rows", "fastest full comparison / strata rows", ratio, "x",
               ">= 50x at 1 GB, 10 rows" if (mb >= 1000 and changes == 10) else "",
               ratio >= 50 if (mb >= 1000 and changes == 10) else None)
        if mb >= 1000 and changes == 10:
            engine = fig["strata page diff, engine part"]
            report(f"diff, {mb} MB, {changes:,} changed rows", "engine page diff target", engine * 1e3, "ms",
                   "< 100 ms", engine < 0.1)
        cp.delete_branch(db.name, name)
    cp.delete_database(db.name)


def teardown_module(module: object) -> None:
    if not results:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(RESULTS, exist_ok=True)
    methods = list(next(iter(results.values())))
    lines = ["| database | changed rows | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for (mb, changes), fig in sorted(results.items()):
        lines.append(f"| {mb} MB | {changes:,} | " + " | ".join(f"{fig[m] * 1e3:,.1f} ms" for m in methods) + " |")
    with open(os.path.join(RESULTS, "diff.md"), "w") as f:
        f.write("Branch diff against full comparisons (2 cores, one run; "
                "`.venv/bin/python -m pytest bench/test_diff_bench.py --benchmark-only`)\n\n")
        f.write("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(CHANGES), figsize=(13, 4.5), sharey=True)
    for ax, changes in zip(axes, CHANGES, strict=True):
        for m in methods:
            sizes = sorted(mb for (mb, c) in results if c == changes)
            ax.plot(sizes, [results[(s, changes)][m] * 1e3 for s in sizes], marker="o", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{changes:,} changed rows")
        ax.set_xlabel("database (MB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "diff.png"), dpi=110)
