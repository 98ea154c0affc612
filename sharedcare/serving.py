"""Run the hub under uvicorn: one process, or a supervisor with one listening socket per worker.

With ``--workers N`` uvicorn's own supervisor shares one listening socket between the
workers. Whichever worker's event loop wakes first accepts every connection waiting in
the queue, so a burst of keep-alive connections (a client's connection pool, a proxy's
upstream pool) lands mostly on one worker and stays there: in bench/store.py 16
connections left one of two workers nearly idle (the hub used 0.97 of 2 cores).

On Linux this module gives every worker its *own* socket on the same address, bound with
``SO_REUSEPORT``: the kernel then hashes each new connection to one of the sockets, so
connections spread evenly over the workers whatever their event loops are doing. The
supervisor opens all the sockets before it starts the workers and keeps them open, so
connections that arrive while a worker starts (or is replaced after a crash) wait in its
socket's queue instead of being refused. Workers are uvicorn's own worker processes
(``uvicorn.supervisors.multiprocess.Process``: a health-check pipe and ``Server.run``);
a worker that dies or stops answering its health check is replaced, one that fails
during start-up stops the hub (as with uvicorn). Unlike uvicorn's supervisor, a starting
worker gets ``STARTUP_GRACE`` seconds before its health checks count: on a busy machine
importing the app can take longer than the 5 s health-check timeout, and uvicorn then
kills and restarts the worker over and over. SIGINT/SIGTERM stop the workers
gracefully (each runs the app's shutdown) and then the supervisor.

``--workers 1``, and platforms where ``SO_REUSEPORT`` does not balance (anything but
Linux), run ``uvicorn.run`` exactly as before.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from typing import Any

import structlog
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

log = structlog.get_logger("sharedcare.serve")
STARTUP_GRACE = 60.0  # seconds a starting worker may take before its health checks count


def balanced_sockets_supported() -> bool:
    """Whether the kernel balances connections across ``SO_REUSEPORT`` sockets (Linux ≥ 3.9)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def run(app: str, *, host: str, port: int, workers: int, **options: Any) -> None:
    """Serve ``app`` (an import string) on ``host:port`` with ``workers`` processes."""
    if workers <= 1 or not balanced_sockets_supported():
        uvicorn.run(app, host=host, port=port, workers=workers, **options)
        return
    config = uvicorn.Config(app, host=host, port=port, workers=workers, **options)
    try:
        sockets = listening_sockets(host, port, workers, config.backlog)
    except OSError as exc:
        log.error("cannot listen", host=host, port=port, error=str(exc))
        sys.exit(STARTUP_FAILURE)
    log.info(
        "serving",
        host=host,
        port=sockets[0].getsockname()[1],
        workers=workers,
        sockets="SO_REUSEPORT",
    )
    try:
        Supervisor(config, sockets).run()
    finally:
        for sock in sockets:
            sock.close()


def listening_sockets(host: str, port: int, count: int, backlog: int = 2048) -> list[socket.socket]:
    """``count`` listening TCP sockets on one address, each with ``SO_REUSEPORT``.

    Port 0 picks a free port for the first socket and binds the others to the same one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Supervisor:
    """Starts worker ``i`` on ``sockets[i]``, replaces workers that die, stops them all on a signal."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]):
        self.config = config
        self.sockets = sockets
        self.processes: list[Process] = []
        self.started_at: list[float] = []
        self.should_exit = threading.Event()

    def _start(self, index: int) -> Process:
        process = Process(self.config, [self.sockets[index]])
        process.start()
        if index < len(self.started_at):
            self.started_at[index] = time.monotonic()
        else:
            self.started_at.append(time.monotonic())
        return process

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.should_exit.set())
        self.processes = [self._start(i) for i in range(len(self.sockets))]
        log.info("workers started", pids=[p.pid for p in self.processes])
        while not self.should_exit.wait(0.5):
            self.keep_alive()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join()
        log.info("workers stopped")

    def keep_alive(self) -> None:
        """Replace a worker that exited or no longer answers its health check."""
        for index, process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            starting = time.monotonic() - self.started_at[index] < STARTUP_GRACE
            if starting and process.process.is_alive():
                continue
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # Broken configuration, database or app: it would fail the same way again.
                log.error("worker failed to start; stopping", pid=process.pid)
                self.should_exit.set()
                return
            log.warning(
                "worker died; starting a new one", pid=process.pid, exitcode=process.exitcode
            )
            self.processes[index] = self._start(index)
