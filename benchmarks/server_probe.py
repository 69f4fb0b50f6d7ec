"""Is the Hypha server answering? A probe in a process of its own, measuring round trips.

The worker lives in the server's event loop, so a stall there is a stall for every
Hypha user. The probe keeps asking the server, every ``period`` seconds, for a websocket
``echo`` (through Hypha's RPC) and an HTTP liveness check, from a separate process (so
neither the benchmark's own work nor its interpreter lock can delay it); the worst round
trip during a phase is the longest the server kept a user waiting.

``with ServerProbe(url, token) as probe: ...`` then ``probe.report``; run as a script,
it probes until its standard input closes and prints the round trips as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


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
    def __init__(self, url: str, token: str, period: float = 0.02) -> None:
        self.url = url
        self.token = token
        self.period = period
        self.report = ProbeReport()
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProbe:
        self._process = subprocess.Popen(
            [sys.executable, __file__, self.url, str(self.period)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PROBE_TOKEN": self.token},
        )
        ready = self._process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"server probe did not start: {ready!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        out, _ = self._process.communicate("", timeout=60)
        # hypha_rpc may log to standard output too: the report is the last JSON line.
        data = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        self.report = ProbeReport(echo=data["echo"], health=data["health"])


async def _probe(url: str, token: str, period: float) -> ProbeReport:
    import httpx
    from hypha_rpc import connect_to_server

    report = ProbeReport()
    api = await connect_to_server({"server_url": url, "token": token})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read() else None)
    async with httpx.AsyncClient(timeout=30) as http:
        print("ready", flush=True)
        while not stop.is_set():
            began = time.perf_counter()
            await api.echo("ping")
            middle = time.perf_counter()
            await http.get(f"{url}/health/liveness")
            report.echo.append(middle - began)
            report.health.append(time.perf_counter() - middle)
            await asyncio.sleep(period)
    await api.disconnect()
    return report


if __name__ == "__main__":
    result = asyncio.run(_probe(sys.argv[1], os.environ["PROBE_TOKEN"], float(sys.argv[2])))
    print(json.dumps({"echo": result.echo, "health": result.health}))
