"""A throw-away PostgreSQL server on 127.0.0.1, for the test suite and the registry benchmark.

    with LocalPostgres() as server:          # initdb in a temporary folder, pg_ctl start on a free port
        reg = Registry.open(server.url)      # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
        server.restart()                     # pg_ctl restart: clients lose their connections

It needs the PostgreSQL server programs (``initdb``, ``pg_ctl``: Debian's ``postgresql`` package) and runs them
as the ``postgres`` user when started by root (the server refuses to run as root). Nothing outside its own
temporary folder is touched, and the server only listens on 127.0.0.1 with no Unix socket elsewhere.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

DEFAULT_PORT = 55432


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def unavailable_reason() -> str | None:
    """Why a local server cannot be started here (None: it can)."""
    missing = [name for name in ("initdb", "pg_ctl") if _binary(name) is None]
    if missing:
        return f"the PostgreSQL server programs are not installed ({', '.join(missing)} not found)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def _free_port(preferred: int) -> int:
    for port in dict.fromkeys([preferred, 0]):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


class LocalPostgres:
    """One private PostgreSQL server: ``start()``, ``restart()``, ``stop()``; ``url`` reaches it.

    Args:
        port: the port to listen on; None: 55432 when free, else any free port; 0: any free port.
        fsync: False makes commits cheap (tests: no wait for the disk, yet nothing acknowledged is lost when the
            server process crashes); True measures what a real server pays (benchmarks).
    """

    def __init__(self, port: int | None = None, *, fsync: bool = True) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"Cannot start a local PostgreSQL server: {reason}.")
        self.port = _free_port(DEFAULT_PORT if port is None else port)
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def _checked(self, *args: str, timeout: float = 60.0) -> None:
        out = self._run(*args, timeout=timeout)
        if out.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}"
                + (f"\nserver log:\n{log}" if log else "")
            )

    def start(self) -> Self:
        if self.running:
            return self
        if self._user is not None:
            shutil.chown(self.root, user=self._user)
        if not self.data.exists():
            self._checked(
                str(_binary("initdb")), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"
            )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        if not self.fsync:
            # Commits still wait for the WAL write (synchronous_commit stays on), just not for the disk: a
            # crashed server (restart -m immediate) loses nothing it acknowledged, only a crashed machine would.
            options += " -c full_page_writes=off"
        self._options = options
        self._checked(
            str(_binary("pg_ctl")), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start"
        )
        self.running = True
        return self

    def restart(self, mode: str = "fast") -> None:
        """Restart the server; ``mode`` ``fast`` ends every session, ``immediate`` is a crash and recovery."""
        self._checked(
            str(_binary("pg_ctl")),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            self._options,
            "-m",
            mode,
            "-w",
            "restart",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (``start()`` brings it back)."""
        if self.running:
            self._run(str(_binary("pg_ctl")), "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} did not come up within {timeout_s:g} s")

    def close(self) -> None:
        """Stop the server and delete its folder."""
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_PORT", "LocalPostgres", "unavailable_reason"]
