"""Is the Hypha server answering? A probe in a thread of its own, measuring round trips.

The worker lives in the server's event loop, so a stall there is a stall for every
Hypha user. The probe keeps asking the server, every ``period`` seconds, for a websocket
``echo`` (through Hypha's RPC) and an HTTP liveness check, from its own thread and event
loop so the benchmark's own work cannot delay it; the worst round trip during a phase is
the longest the server kept a user waiting.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class ProbeReport:
    echo: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)

    def worst_ms(self) -> float:
        return max(self.echo + self.health, default=float("nan")) * 1000

    def p50_ms(self) -> float:
        values = self.echo + self.health
        return statistics.median(values) * 1000 if values else float("nan")


class ServerProbe:
    """``with ServerProbe(url, token) as probe: ...`` then ``probe.report``."""

    def __init__(self, url: str, token: str, period: float = 0.02) -> None:
        self.url = url
        self.token = token
        self.period = period
        self.report = ProbeReport()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> ServerProbe:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise RuntimeError(f"server probe failed: {self._error}") from self._error

    async def _run(self) -> None:
        from hypha_rpc import connect_to_server

        try:
            api = await connect_to_server({"server_url": self.url, "token": self.token})
            async with httpx.AsyncClient(timeout=30) as http:
                self._ready.set()
                while not self._stop.is_set():
                    began = time.perf_counter()
                    await api.echo("ping")
                    middle = time.perf_counter()
                    await http.get(f"{self.url}/health/liveness")
                    end = time.perf_counter()
                    self.report.echo.append(middle - began)
                    self.report.health.append(end - middle)
                    await asyncio.sleep(self.period)
            await api.disconnect()
        except BaseException as error:  # surfaced in __exit__
            self._error = error
            self._ready.set()
