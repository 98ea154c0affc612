"""A provider simulator in a child process, for the demo and benchmarks.

:class:`~sharedcare.simulators.provider.ProviderServer` serves from a thread of the calling
process, which is simplest for tests but shares that process's GIL: a hub, a load generator and
three providers in one interpreter measure each other. :class:`ProviderProcess` runs the same app
(any :class:`ProviderConfig`, passed as JSON) in ``python -m sharedcare.simulators.provider_process``
and offers the same ``base_url`` / ``start()`` / ``stop()`` / context manager; faults change
over HTTP (``PUT /_admin/faults``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import date
from types import TracebackType
from typing import Any, Self

import httpx

from sharedcare.simulators.clinical import SimPerson
from sharedcare.simulators.provider import ProviderConfig, provider_people

__all__ = ["ProviderProcess", "config_from_json", "config_to_json"]


def config_to_json(config: ProviderConfig) -> str:
    """``config`` as JSON (for the child's command line)."""
    fields = dataclasses.asdict(config)
    fields["as_of"] = config.as_of.isoformat()
    return json.dumps(fields)


def config_from_json(text: str) -> ProviderConfig:
    """The inverse of :func:`config_to_json`."""
    fields: dict[str, Any] = json.loads(text)
    fields["as_of"] = date.fromisoformat(fields["as_of"])
    fields["latency_ms"] = tuple(fields["latency_ms"])
    return ProviderConfig(**fields)


class ProviderProcess:
    """``with ProviderProcess(ProviderConfig(id="leeds-pas")) as p: httpx.get(p.base_url + ...)``"""

    def __init__(self, config: ProviderConfig, host: str = "127.0.0.1", port: int = 0):
        self.config = config
        self.host = host
        self.port = port
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def people(self) -> list[SimPerson]:
        return provider_people(self.config)

    def start(self, timeout: float = 30.0) -> str:
        """Start the child, wait until it answers ``/metadata`` and return its base URL."""
        argv = [sys.executable, "-m", __name__, config_to_json(self.config), self.host]
        self.proc = subprocess.Popen(
            [*argv, str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ},
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()  # the child prints its URL first
        if not self.url.startswith("http"):
            self.stop()
            raise RuntimeError(f"provider simulator {self.config.id} did not start")
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/metadata", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"provider simulator {self.config.id} did not answer")
            time.sleep(0.05)

    def set_faults(self, **changes: Any) -> dict[str, Any]:
        """Change some faults (``PUT /_admin/faults``); returns the faults now in force."""
        response = httpx.put(f"{self.url}/_admin/faults", json=changes, timeout=10)
        response.raise_for_status()
        faults: dict[str, Any] = response.json()
        return faults

    def stop(self) -> None:
        """Ctrl-C the child and wait for it (killed after 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    from sharedcare.simulators.cli import serve
    from sharedcare.simulators.provider import create_provider_app

    config = config_from_json(argv[0])
    host, port = argv[1], int(argv[2])
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed (even with -9): stop rather than linger
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=orphaned, daemon=True).start()
    serve(create_provider_app(config), host, port, f"Provider simulator {config.id}")


if __name__ == "__main__":
    main(sys.argv[1:])
