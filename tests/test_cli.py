"""The command line: one clear line and a non-zero exit for bad input, tables for good input."""

from __future__ import annotations

import pytest

from workbench.cli import main


def test_eval_prints_a_table_and_records_a_baseline(registry_url, capsys):
    assert main(["eval", "--model", "tiny-llama", "--registry", registry_url]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "ppl" in out
    assert main(["runs", "--registry", registry_url, "--format", "csv"]) == 0
    assert "baseline" in capsys.readouterr().out


def test_runs_exports_to_a_file(registry_url, tmp_path, capsys):
    main(["eval", "--model", "tiny-llama", "--registry", registry_url])
    target = tmp_path / "runs.json"
    assert main(["runs", "--registry", registry_url, "--format", "json", "--output", str(target)]) == 0
    assert '"baseline"' in target.read_text()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--model", "/no/such/folder"], "/no/such/folder"),
        (["eval", "--model", "tiny-llama", "--suite", "nope"], "nope"),
        (["eval", "--model", "tiny-llama", "--text", "/no/such.txt"], "no such file"),
        (["run", "--model", "tiny-llama", "--technique", "gtpq"], "Unknown technique"),
        (["run", "--model", "tiny-llama", "--technique", "rtn", "--param", "bits"], "name=value"),
        (["runs", "--columns", "nope"], "Unknown column"),
    ],
)
def test_bad_input_prints_one_line_without_traceback(argv, needle, registry_url, capsys):
    assert main([*argv, "--registry", registry_url]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    last = err.split("\r")[-1]  # a progress bar may have been drawn and cleared before the message
    assert last.startswith("error: ") and last.count("\n") == 1


def test_text_file_evaluation_uses_that_text(registry_url, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(200))
    )
    assert main(["eval", "--model", "tiny-llama", "--text", str(text), "--registry", registry_url]) == 0
    assert "baseline" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["runs", "--format", "xml"], "invalid choice: 'xml'"),
        (["sweep", "--model", "tiny-llama", "--technique", "rtn", "--bits", "x"], "invalid int value: 'x'"),
    ],
)
def test_usage_mistakes_are_one_line_too(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1 and "usage:" not in err


def test_a_non_utf8_text_file_is_refused_before_the_model_loads(registry_url, tmp_path, capsys, monkeypatch):
    import workbench.models

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(workbench.models, "load_model", no_load)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    assert main(["eval", "--model", "tiny-llama", "--text", str(binary), "--registry", registry_url]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_a_non_integer_bit_width_says_so(registry_url, capsys):
    assert (
        main(
            [
                "run",
                "--model",
                "tiny-llama",
                "--technique",
                "rtn",
                "--param",
                "bits=abc",
                "--registry",
                registry_url,
            ]
        )
        == 2
    )
    assert "is not a whole number" in capsys.readouterr().err


# ---- sweeps through the technique's parameter space -----------------------------------------------------------


@pytest.mark.parametrize(
    ("technique", "bits", "formats"),
    [("bnb", ["8", "4"], ["int8", "nf4"]), ("quanto", ["8", "4", "2"], ["int8", "int4", "int2"])],
)
def test_sweep_runs_a_format_technique_at_its_widths(technique, bits, formats, registry_url, capsys):
    argv = [
        "sweep",
        "--model",
        "tiny-llama",
        "--technique",
        technique,
        "--bits",
        *bits,
        "--registry",
        registry_url,
    ]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for fmt in formats:
        assert fmt in out
    from workbench.registry import Registry

    with Registry.open(registry_url) as reg:
        frame = reg.runs_frame()
    field = "param_mode" if technique == "bnb" else "param_weights"
    assert sorted(frame[field]) == sorted(formats), frame
    # Fewer bits, fewer bytes: the widths really differ (scales come on top of the codes).
    by_width = frame.set_index(field).loc[formats, "metric_bits_per_weight_linear"]
    assert by_width.is_monotonic_decreasing, by_width


def test_sweep_refuses_a_width_the_technique_lacks_before_any_run(registry_url, capsys):
    argv = [
        "sweep",
        "--model",
        "tiny-llama",
        "--technique",
        "bnb",
        "--bits",
        "8",
        "3",
        "--registry",
        registry_url,
    ]
    assert main(argv) == 2
    assert "takes 4 (nf4), 8 (int8) bits, not 3" in capsys.readouterr().err
    from workbench.registry import Registry

    with Registry.open(registry_url) as reg:
        assert reg.runs_frame(status=None).empty


def test_sweep_refuses_a_group_size_the_model_cannot_take_before_any_run(registry_url, capsys):
    argv = [
        "sweep",
        "--model",
        "tiny-llama",
        "--technique",
        "rtn",
        "--bits",
        "8",
        "4",
        "--param",
        "group_size=48",
        "--registry",
        registry_url,
    ]
    assert main(argv) == 2
    assert "does not divide" in capsys.readouterr().err


def test_techniques_lists_widths_and_one_technique_shows_its_fields_with_help(capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    assert "bnb" in out and "4 (nf4), 8 (int8)" in out and "2 (int2), 4 (int4), 8 (int8)" in out
    assert main(["run", "--help-technique", "rtn"]) == 0
    out = capsys.readouterr().out
    assert "group_size (int, default 32)" in out and "per-channel" in out and "sweep --bits: 2, 3" in out
    assert main(["techniques", "quanto"]) == 0
    assert "weights (str, default 'int4')" in capsys.readouterr().out
