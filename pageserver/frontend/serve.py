"""The front ends on one event loop: the PostgreSQL proxy and the HTTP API,
over a control plane that is either in this process (`ControlPlane`,
embedded) or in the page server process (`RemoteControl`, the service).

Nothing that blocks runs on the loop: the API's routes run in its thread
pool (API_THREADS), the proxy's calls into the control plane in its wake
threads, housekeeping (embedded only: the page server process runs its
own) in a thread. A monitor measures how late the loop runs a 10 ms timer
(`strata_event_loop_lag_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pageserver.control.metrics import LAG_BUCKETS
from pageserver.control.rpc import RemoteControl
from pageserver.frontend.api import make_app
from pageserver.proxy.server import Proxy, ProxyLimits

if TYPE_CHECKING:
    from pageserver.control.plane import ControlPlane

log = logging.getLogger("strata.frontend")

HOST = "127.0.0.1"
LAG_INTERVAL = 0.01  # how often the loop-lag monitor wakes
API_THREADS = 8


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.loop_lag = Histogram("strata_event_loop_lag_seconds",
                                  "How late the front end's event loop (proxy and API) ran a 10 ms timer",
                                  buckets=LAG_BUCKETS, registry=self.registry)

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class Frontend:
    """The front ends, made (imports, the proxy, the API and its schema)
    before they serve: the service's front end makes them while the page
    server opens its store, and gets its token only then (`token` may be a
    callable, read on each request)."""

    def __init__(self, control: ControlPlane | RemoteControl, token: str | Callable[[], str], api_port: int,
                 proxy_port: int, *, host: str = HOST, limits: ProxyLimits | None = None) -> None:
        import anyio.to_thread  # noqa: F401 - (imported here, not on the loop)
        import uvicorn

        self.control, self.host, self.api_port, self.proxy_port = control, host, api_port, proxy_port
        self.metrics = FrontendMetrics()
        self.server: uvicorn.Server | None = None
        self._on_shutdown: Callable[[], None] | None = None
        self.app = make_app(control, token, on_shutdown=self._shutdown, extra_metrics=self.metrics.text)
        self.app.openapi()  # (its schema, built once and kept: not on the first request)
        # last: it registers with the control plane and starts thread pools (nothing to undo if the app failed)
        self.proxy = Proxy(control, host, proxy_port, limits=limits, registry=self.metrics.registry)

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # ours are below: uvicorn's would re-raise SIGTERM before the cleanup

        self._server_class = Server
        self._config = uvicorn.Config(self.app, host=host, port=api_port, log_level="warning", lifespan="off",
                                      access_log=False)

    def _shutdown(self) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        if self.server is not None:
            self.server.should_exit = True

    async def serve(self, *, signals: bool = True, started: Callable[[asyncio.AbstractEventLoop], None] | None = None,
                    on_shutdown: Callable[[], None] | None = None) -> None:
        """Serve until shut down (SIGTERM, SIGINT or POST /v1/shutdown, which
        also calls `on_shutdown`); `started` is called once both listen."""
        import anyio.to_thread

        control, host, api_port, proxy_port = self.control, self.host, self.api_port, self.proxy_port
        metrics, proxy = self.metrics, self.proxy
        self._on_shutdown = on_shutdown
        try:
            await proxy.start()
            loop = asyncio.get_running_loop()
            # the API's routes run in this many threads (anyio's default is 40): more only
            # contend for the GIL with the loop (measured 40, 16, 8: README, reliability)
            anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS

            def exit_now() -> None:
                if self.server is not None:
                    self.server.should_exit = True

            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, exit_now)
            server = self.server = self._server_class(self._config)
            tasks: list[asyncio.Task[Any]] = []

            async def housekeeping() -> None:
                assert not isinstance(control, RemoteControl)
                while True:
                    await asyncio.sleep(1.0)
                    try:
                        done = await asyncio.to_thread(control.maintain)
                        for what, names in done.items():
                            if names:
                                log.info("%s: %s", what, ", ".join(names))
                    except Exception:  # noqa: BLE001 - keep serving; say what went wrong
                        log.exception("housekeeping")

            async def lag_monitor() -> None:
                while True:
                    t0 = loop.time()
                    await asyncio.sleep(LAG_INTERVAL)
                    metrics.loop_lag.observe(max(0.0, loop.time() - t0 - LAG_INTERVAL))

            async def announce() -> None:
                while not server.started:
                    await asyncio.sleep(0.02)
                log.info("serving: API http://%s:%d, proxy %s:%d", host, api_port, host, proxy_port)
                # What start-up made (modules, the API's schemas) lives as long as the process: out
                # of the collector's way, so that a full collection, which stops every thread,
                # scans only what came after (measured: 77 ms -> see README, reliability)
                gc.freeze()
                if started is not None:
                    started(loop)

            if not isinstance(control, RemoteControl):  # (the plane in this process: its housekeeping too)
                tasks.append(asyncio.create_task(housekeeping()))
            tasks += [asyncio.create_task(announce()), asyncio.create_task(lag_monitor())]
            try:
                await server.serve()
            finally:
                for t in tasks:
                    t.cancel()
        finally:
            await proxy.stop()


async def serve(control: ControlPlane | RemoteControl, token: str, api_port: int, proxy_port: int, *,
                host: str = HOST, signals: bool = True,
                started: Callable[[asyncio.AbstractEventLoop], None] | None = None,
                on_shutdown: Callable[[], None] | None = None, limits: ProxyLimits | None = None) -> None:
    """Make the front ends (`Frontend`) and serve them until shut down."""
    fe = Frontend(control, token, api_port, proxy_port, host=host, limits=limits)
    await fe.serve(signals=signals, started=started, on_shutdown=on_shutdown)
