"""The front end's event loop (the proxy and the HTTP API share it), here
over a control plane in the same process (the harder case: the service
runs the control plane in the page server process), stays
responsive while 40 databases are created at once and their catalog
writes fsync, clients connect through the proxy, and status, metrics and
housekeeping run: nothing on the loop waits for a lock held across an
fsync, or does blocking work itself."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading

import httpx
import psycopg

from pageserver.control.plane import ControlPlane
from pageserver.frontend import serve as frontend
from pageserver.service import daemon as service

from .pg import requires_pg

# A call that blocks the loop (a create's RPC or fsync run on it) shows as a
# lag of hundreds of ms; scheduling noise on a shared 2-core box reached 20.8 ms
# (p99 is printed as a figure): the bound is for the first, with room for the second.
LAG_P99_LIMIT = 0.050
CREATES = 40
ROUNDS = 10  # bursts of CREATES, for enough samples (p99 is then the 5th worst of ~500)
TIMER = 0.002
CLIENTS = """
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import httpx, psycopg
cfg = json.loads(sys.argv[1])
headers = {"Authorization": "Bearer " + cfg["token"]}
api = httpx.Client(base_url=cfg["api"] + "/v1", headers=headers, timeout=120,
                   limits=httpx.Limits(max_connections=cfg["creates"]))
busy, connects, failed, bursts = threading.Event(), [0], [], []
busy.set()

def clients(uri):
    while busy.is_set():
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("select 1")
        connects[0] += 1

def readers():
    while busy.is_set():
        api.get("/status")
        httpx.get(cfg["api"] + "/metrics", headers=headers)

side = [threading.Thread(target=clients, args=(u,)) for u in cfg["uris"]] + [threading.Thread(target=readers)]
for t in side:
    t.start()
with ThreadPoolExecutor(cfg["creates"]) as ex:
    for rnd in range(cfg["rounds"]):
        t0 = time.monotonic()
        for r in ex.map(lambda i: api.post("/databases", json={"name": f"burst{rnd}-{i}"}), range(cfg["creates"])):
            if r.status_code != 201:
                failed.append(r.text)
        bursts.append(time.monotonic() - t0)
busy.clear()
for t in side:
    t.join()
print(json.dumps({"bursts": bursts, "connects": connects[0], "failed": failed}))
"""


@requires_pg
def test_event_loop_lag_while_40_databases_are_created(tmp_path):
    cp = ControlPlane(str(tmp_path / "home"), max_computes=8).open()
    api_port, proxy_port = service._free_port(service.HOST), service._free_port(service.HOST)
    cp.proxy_port = proxy_port
    token = "test-token"
    started = threading.Event()
    box: dict[str, asyncio.AbstractEventLoop] = {}

    def on_start(loop: asyncio.AbstractEventLoop) -> None:
        box["loop"] = loop
        started.set()

    runner = threading.Thread(target=lambda: asyncio.run(frontend.serve(
        cp, token, api_port, proxy_port, signals=False, started=on_start)), daemon=True)
    runner.start()
    api = httpx.Client(base_url=f"http://{service.HOST}:{api_port}/v1",
                       headers={"Authorization": f"Bearer {token}"}, timeout=120)
    try:
        assert started.wait(60), "the service did not start"
        loop = box["loop"]
        uris = [api.post("/databases", json={"name": f"warm{i}"}).json()["uri"] for i in range(2)]
        for uri in uris:
            psycopg.connect(uri).close()  # running, so that connections in the burst reach computes

        samples: list[float] = []
        measuring = threading.Event()
        measuring.set()

        async def probe() -> None:  # how late a short timer fires on the service's loop
            while measuring.is_set():
                t0 = loop.time()
                await asyncio.sleep(TIMER)
                if busy.is_set():
                    samples.append(loop.time() - t0 - TIMER)

        busy = threading.Event()
        busy.set()
        probing = asyncio.run_coroutine_threadsafe(probe(), loop)
        # the clients run in a process of their own, as clients do: not on this process's GIL
        out = subprocess.run([sys.executable, "-c", CLIENTS, json.dumps({
            "api": f"http://{service.HOST}:{api_port}", "token": token, "uris": uris,
            "rounds": ROUNDS, "creates": CREATES})], capture_output=True, text=True, timeout=600)
        busy.clear()
        measuring.clear()
        probing.result(10)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        bursts, connects = report["bursts"], report["connects"]
        assert report["failed"] == [], report["failed"][:3]
        samples.sort()
        p99 = samples[int(len(samples) * 0.99)]
        print(f"event-loop lag while {CREATES} databases were created at once over HTTP, {ROUNDS} times "
              f"(p50 {statistics.median(bursts) * 1e3:.0f} ms a burst), "
              f"{connects} proxy connections and status/metrics polled: {len(samples)} samples, "
              f"p50 {statistics.median(samples) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
              f"max {samples[-1] * 1e3:.1f} ms")
        assert len(samples) > 20
        assert p99 < LAG_P99_LIMIT, f"event-loop lag p99 {p99 * 1e3:.1f} ms"
    finally:
        try:
            api.post("/shutdown")
        except httpx.HTTPError:
            pass
        runner.join(60)
        api.close()
        cp.close()
    assert not os.path.ismount(cp.ps.mountpoint)
