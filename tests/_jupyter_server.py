"""Start and stop JupyterLab and Voila for the notebook and browser tests, fully isolated from the real home.

Every server gets its own HOME and Jupyter config/data/runtime folders under a temporary directory, listens on
127.0.0.1 only, runs in its own process group (so the kernels it starts die with it) and is stopped when the
``with`` block ends, also when a test fails. A kernelspec written into the private data folder points at this
interpreter, so notebooks always run on the virtual environment the tests run on, whatever ``python`` on PATH is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# Flags for Debian's Chromium in a container: no sandbox (root), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_NAME = "python3"


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it, so parallel test runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_kernelspec(data_dir: Path, name: str = KERNEL_NAME) -> Path:
    """Write a kernelspec running ipykernel on ``sys.executable``; returns its folder.

    The environment's own spec says ``python``, which resolves through PATH in some launchers; an absolute
    interpreter path removes any doubt about which environment (and which torch) the notebooks import.
    """
    folder = data_dir / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (workbench tests)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
    return folder


def isolated_env(base: Path, registry_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a server or kernel that writes nothing outside ``base`` (except the shared demo cache).

    ``WORKBENCH_HOME`` is kept from the test process so the prepared demo model is reused, not extracted again.
    The repository root goes on PYTHONPATH because the notebooks run from a copy outside the repository.
    """
    home, config, data, runtime = (
        base / n for n in ("home", "jupyter-config", "jupyter-data", "jupyter-runtime")
    )
    for folder in (home, config, data, runtime):
        folder.mkdir(parents=True, exist_ok=True)
    write_kernelspec(data)
    # The "Jupyter news" prompt of a fresh profile would cover part of the page in screenshots.
    labconfig = config / "labconfig"
    labconfig.mkdir(exist_ok=True)
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(home),
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_DATA_DIR": str(data),
            "JUPYTER_RUNTIME_DIR": str(runtime),
            # Searched before the environment's own share/jupyter, so our kernelspec wins.
            "JUPYTER_PATH": str(data),
            "IPYTHONDIR": str(base / "ipython"),
            "MPLCONFIGDIR": str(base / "mpl"),
            "JUPYTER_PLATFORM_DIRS": "1",
            "WORKBENCH_REGISTRY": registry_url,
            "WORKBENCH_HOME": os.environ.get("WORKBENCH_HOME", str(ROOT / ".cache" / "workbench-home")),
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "OMP_NUM_THREADS": "2",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if extra:
        env.update(extra)
    return env


def copy_notebooks(dest: Path, source: Path = NOTEBOOKS) -> Path:
    """Copy the committed notebooks (without checkpoints or outputs folders) to ``dest``; returns ``dest``."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "exports", "*.db"))
    return dest


@dataclass
class Server:
    """A running server: where to reach it and where its log goes."""

    url: str  # base URL, no trailing slash
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 6000) -> str:
        """The last ``tail`` characters of the server log, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left: servers start kernels as children."""
    if process.poll() is not None:
        return
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The leader is gone; make sure no child (a kernel) outlives it.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode} before answering:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last = str(err)
        time.sleep(0.3)
    raise TimeoutError(
        f"server did not answer {url} within {timeout:.0f} s ({last}):\n{log_path.read_text(errors='replace')[-4000:]}"
    )


@contextmanager
def _serve(
    cmd: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    ready_url: str,
    base_url: str,
    token: str,
    timeout: float,
) -> Iterator[Server]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(cmd),
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: one killpg takes the server and its kernels
        )
        try:
            _wait_http(ready_url, process, log_path, timeout)
            yield Server(url=base_url, token=token, process=process, log_path=log_path)
        finally:
            _stop(process)


@contextmanager
def jupyter_lab(
    notebook_dir: Path,
    env: dict[str, str],
    *,
    log_path: Path,
    token: str = "workbench-test",
    timeout: float = 90.0,
) -> Iterator[Server]:
    """JupyterLab serving ``notebook_dir`` on 127.0.0.1 at a free port, started like ``workbench lab`` does."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--notebook-dir={notebook_dir}",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.port_retries=0",
        "--LabApp.news_url=",
        "--ServerApp.open_browser=False",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # JupyterLab refuses to run as root otherwise (containers, CI)
    base = f"http://127.0.0.1:{port}"
    with _serve(
        cmd, env, notebook_dir, log_path, f"{base}/api/status?token={token}", base, token, timeout
    ) as srv:
        yield srv


@contextmanager
def voila_dashboard(
    notebook_dir: Path,
    env: dict[str, str],
    *,
    log_path: Path,
    token: str = "workbench-test",
    notebook: str | None = None,
    timeout: float = 90.0,
) -> Iterator[Server]:
    """The dashboard exactly as users start it: ``workbench lab --dashboard`` on a copy of the notebooks
    (its default notebook unless ``notebook`` is given)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "workbench.cli",
        "lab",
        "--dashboard",
        "--port",
        str(port),
        "--token",
        token,
        "--notebooks",
        str(notebook_dir),
    ] + (["--notebook", notebook] if notebook else [])
    base = f"http://127.0.0.1:{port}"
    # Voila serves static files without rendering (and so without starting a kernel): a cheap readiness probe.
    ready = f"{base}/voila/static/voila.js?token={token}"
    with _serve(cmd, env, notebook_dir, log_path, ready, base, token, timeout) as srv:
        yield srv
