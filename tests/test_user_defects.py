"""What a new user ran into: leftovers of killed runs, input errors found after a run was recorded, truncated
GGUF files, spreadsheet formulas and markup in exports, a fixed JupyterLab token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from workbench import evaluate as ev
from workbench.tempdirs import owned_tempdir, remove_leftovers

ROOT = Path(__file__).resolve().parents[1]

SUITE = ev.Suite(
    "leftover-test", n_tokens=1024, context_length=128, batch_size=1, speed=False, n_generations=0
)

# ---- 1. a run killed while computing base outputs --------------------------------------------------------

_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from workbench import evaluate as ev
    from workbench.progress import Progress
    from workbench.tiny import byte_tokenizer, tiny_llama

    suite = ev.Suite("leftover-test", n_tokens=1024, context_length=128, batch_size=1, speed=False,
                     n_generations=0)

    def stall(fraction, message):
        if message.startswith("base model: chunk 2"):
            print("computing", flush=True)
            time.sleep(600)  # killed here, with the entry's temporary folder half written

    ev.base_outputs(tiny_llama(), byte_tokenizer(), suite, base_fingerprint="fp-killed", progress=Progress(stall))
    """
)


def _killed_leftover(home: Path) -> Path:
    """Run base outputs in a child process and SIGKILL it mid-computation; return the folder it left."""
    env = {**os.environ, "WORKBENCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == b"computing", "the child did not reach the computation"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    left = [p for p in (home / "base_outputs").iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and (left[0] / "nll.npy").exists()
    return left[0]


def test_a_killed_runs_temporary_folder_is_removed_on_the_next_start_and_a_live_one_kept(
    tiny_llama, byte_tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    killed = _killed_leftover(tmp_path)
    root = tmp_path / "base_outputs"
    live = owned_tempdir(root, ".tmp-")  # this process's, computing
    # The same pid as this process but started at another time: a dead owner whose pid was reused.
    pid, start, host = live.name[len(".tmp-") :].split("-")[:3]
    reused = root / f".tmp-{pid}-{int(start) - 3600}-{host}-abcdefgh"
    reused.mkdir()
    old_style = root / ".tmp-k3j4h5g6"  # named before folders recorded their owner
    old_style.mkdir()
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(old_style, (week_ago, week_ago))
    recent_old_style = root / ".tmp-a1b2c3d4"
    recent_old_style.mkdir()

    ev.clear_memory_cache()
    out = ev.base_outputs(tiny_llama, byte_tokenizer, SUITE, base_fingerprint="fp-next")
    assert out.n_tokens == 8 * 127
    assert not killed.exists() and not reused.exists() and not old_style.exists()
    assert live.is_dir() and recent_old_style.is_dir()  # a live owner, or one that cannot be asked yet
    assert remove_leftovers(root, ".tmp-") == []


def test_leftovers_of_dead_pids_go_and_live_processes_folders_stay(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from workbench.tempdirs import owned_tempdir; print(owned_tempdir(sys.argv[1], '.x-'))",
                str(tmp_path),
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        dead = Path(other.stdout.strip())  # its process has exited
        # A folder of a running process, named as that process would name it.
        import psutil

        start = int(psutil.Process(sleeper.pid).create_time())
        host = dead.name[len(".x-") :].split("-")[2]
        running = tmp_path / f".x-{sleeper.pid}-{start}-{host}-zz9yy8xx"
        running.mkdir()
        unrelated = tmp_path / ".x-not-ours"
        unrelated.mkdir()
        assert dead.is_dir()
        assert remove_leftovers(tmp_path, ".x-") == [dead]
        assert running.is_dir() and unrelated.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_leftovers(tmp_path, ".x-") == [running]
