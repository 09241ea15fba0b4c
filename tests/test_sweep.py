"""Sweeps: the file format and its messages, the grid, the local and Ray executors, resuming, dry runs, the
command line, "Run as sweep" in the Route and Distill tabs, and the host filter in Compare.

Tiny random models and a tiny suite throughout; the Ray tests start one local instance for the module (about
10 s). Without Ray installed they fail, unless WORKBENCH_SKIP_RAY=1 is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.errors import ConfigError
from workbench.evaluate import Suite
from workbench.registry import Registry
from workbench.sweep import Sweep, known_fingerprint, run_sweep, start_local_ray, vary, worker_url

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "sweeps"
WAIT = 120
SMALL = {
    "name": "sweep-test",
    "n_tokens": 256,
    "context_length": 64,
    "n_generations": 0,
    "speed_prompt": 16,
    "speed_tokens": 2,
    "speed_repeats": 1,
}
SUITE = Suite(**SMALL)


def _write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _runs(url: str):
    with Registry.open(url) as reg:
        return reg.runs_frame(status=None)


# ---- the file: what it means ---------------------------------------------------------------------------


def test_the_grid_is_the_product_of_each_fields_values_in_order(tmp_path):
    path = _write(
        tmp_path,
        """
models: [tiny-llama]
suites: [{name: sweep-test, n_tokens: 256, context_length: 64}]
pipelines:
  - baseline
  - rtn: {bits: 8..6, group_size: [32, 64], symmetric: false}
  - [prune: {drop: 1}, rtn: {bits: [4, 4]}]
""",
    )
    sweep = Sweep.from_yaml(path)
    labels = [c.label for c in sweep.configurations()]
    assert labels == [
        "baseline",
        "rtn 8b g32",
        "rtn 8b g64",
        "rtn 7b g32",
        "rtn 7b g64",
        "rtn 6b g32",
        "rtn 6b g64",
        "prune -1L → rtn 4b g32",  # the same pipeline twice is one configuration
    ]


def test_ranges_name_the_model_and_all_is_the_declared_range():
    sweep = Sweep.from_dict(
        {
            "models": ["tiny-moe"],
            "pipelines": [{"route": {"k": "1..E"}}, {"route": {"k": "all"}}, {"prune": {"drop": "1..L-1"}}],
        }
    )
    configs = sweep.configurations()
    ks = [c.pipeline[0].k for c in configs if c.pipeline[0].__class__.__name__ == "RouteConfig"]
    assert ks == [1, 2, 3, 4, 5, 6, 7, 8]  # `all` (8 down to 1) adds nothing new: each k once
    assert [c.pipeline[0].drop for c in configs[8:]] == [1]  # tiny-moe has 2 decoder layers
    bnb = Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"bnb": {"bits": "all"}}]})
    assert [c.pipeline[0].mode for c in bnb.configurations()] == ["int8", "nf4"]  # the format space


def test_a_tuple_field_takes_a_list_as_one_value_and_a_list_of_lists_as_choices():
    one = Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"prune": {"layers": [0]}}]})
    assert [c.pipeline[0].layers for c in one.configurations()] == [(0,)]
    two = Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"prune": {"layers": [[0], [1]]}}]})
    assert [c.pipeline[0].layers for c in two.configurations()] == [(0,), (1,)]


def test_steps_of_a_parameter_space_start_at_the_panels_default_point():
    from workbench.models import load_model
    from workbench.techniques.space import parameter_space

    sweep = Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"rtn": {"bits": 3}}]})
    (config,) = sweep.configurations()
    space = parameter_space("rtn", load_model("tiny-llama").model)
    assert config.pipeline[0] == space.config(bits=3)
    assert sweep.needs_weights()  # the group size is the model's default point
    explicit = Sweep.from_dict(
        {"models": ["tiny-llama"], "pipelines": [{"rtn": {"bits": 3, "group_size": 32, "symmetric": True}}]}
    )
    assert not explicit.needs_weights()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "models: [tiny-llama]\npipelines:\n  - rtnn: {bits: 4}\n",
            "grid.yaml:3: pipelines[0].rtnn: unknown",
        ),
        (
            "models: [tiny-llama]\npipelines:\n  - rtn:\n      bitz: 4\n",
            "grid.yaml:4: pipelines[0].rtn.bitz: rtn has",
        ),
        (
            "models: [tiny-llama]\npipelines:\n  - rtn: {bits: 2...8}\n",
            "grid.yaml:3: pipelines[0].rtn.bits: '2...8'",
        ),
        ("models: [tiny-llama]\npipelines:\n  - rtn: {bits: 1..X}\n", "range end 'X' is not a number"),
        ("models: [tiny-llama]\npipeline:\n  - rtn: {bits: 4}\n", "grid.yaml:2: pipeline: unknown key"),
        ("models: [tiny-llama]\npipelines:\n  - {rtn: {}, gptq: {}}\n", "a step names one technique"),
        ("models: [tiny-llama]\nsuites: [fast]\npipelines: [baseline]\n", "grid.yaml:2: suites[0]: Unknown"),
        ("models: [tiny-llama]\npipelines:\n  - rtn: {bits: []}\n", "an empty list tries nothing"),
        ("models: [tiny-llama\npipelines: []\n", "not valid YAML"),
        ("pipelines: [baseline]\n", "no models"),
    ],
)
def test_a_bad_file_is_refused_naming_line_and_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        Sweep.from_yaml(_write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_names_get_a_suggestion_and_the_known_ones():
    with pytest.raises(ConfigError) as err:
        Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"rtn": {"group_sise": 32}}]})
    assert "Did you mean 'group_size'?" in str(err.value) and "Fields: bits" in str(err.value)


def test_values_the_model_cannot_take_are_refused_before_anything_runs(tmp_path, registry_url):
    path = _write(
        tmp_path, "models: [tiny-llama]\npipelines:\n  - rtn: {bits: 4}\n  - rtn: {bits: 4, group_size: 48}\n"
    )
    with pytest.raises(ConfigError) as err:
        run_sweep(Sweep.from_yaml(path), registry=registry_url)
    assert "grid.yaml:4: pipelines[1]: rtn 4b g48 on tiny-llama" in str(err.value)
    assert "does not divide" in str(err.value)
    assert _runs(registry_url).empty  # the first, valid configuration did not run either
    bad = Sweep.from_dict({"models": ["tiny-llama"], "pipelines": [{"route": {"k": "1..E"}}]})
    with pytest.raises(ConfigError) as err:
        bad.configurations()
    assert "pipelines[0].route.k: E: " in str(err.value) and "experts" in str(err.value)


def test_the_example_files_are_valid():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        sweep = Sweep.from_yaml(path)
        assert sweep.pipelines and sweep.models, path
        built = sweep.replace(models=["tiny-llama"]).configurations(lambda _spec: None)
        assert built, path  # without a model: the generic spaces, nothing checked


# ---- running locally -----------------------------------------------------------------------------------


def _grid(model: str = "tiny-llama", bits=(8, 4)) -> Sweep:
    return Sweep.from_dict(
        {
            "name": "t",
            "models": [model],
            "suites": [SMALL],
            "tags": ["grid"],
            "pipelines": ["baseline", {"rtn": {"bits": list(bits), "group_size": 32, "symmetric": False}}],
        }
    )


def test_a_local_sweep_records_each_run_and_a_second_pass_reuses_them(registry_url):
    seen = []
    report = run_sweep(_grid(), registry=registry_url, on_result=lambda item, i, n: seen.append((i, n)))
    assert report.ok and [i.status for i in report.items] == ["done"] * 3
    assert seen == [(0, 3), (1, 3), (2, 3)]
    runs = _runs(registry_url)
    assert len(runs) == 3 and all("sweep:t" in t and "grid" in t for t in runs["tags"])
    table = report.table()
    assert list(table["run_id"]) == report.run_ids and set(table["setting"]) >= {"8b g32", "4b g32"}
    again = run_sweep(_grid(), registry=registry_url)
    assert [i.reused for i in again.items] == [True, True, True] and again.run_ids == report.run_ids
    assert "3 from registry" in again.summary()


def test_an_interrupted_sweep_continues_where_it_stopped(registry_url):
    from workbench.experiment import run_experiment

    calls = []

    def stops_at_the_third(model, pipeline, suite, **kwargs):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_experiment(model, pipeline, suite, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(_grid(bits=(8, 4, 3)), registry=registry_url, runner=stops_at_the_third)
    assert len(_runs(registry_url)) == 2
    plan = run_sweep(_grid(bits=(8, 4, 3)), registry=registry_url, dry_run=True)
    assert [i.status for i in plan.items] == ["known", "known", "to run", "to run"]
    report = run_sweep(_grid(bits=(8, 4, 3)), registry=registry_url)
    assert [i.reused for i in report.items] == [True, True, False, False]
    assert len(_runs(registry_url)) == 4


def test_a_dry_run_on_a_folder_model_reads_the_remembered_fingerprint_without_loading(
    tmp_path, registry_url, monkeypatch
):
    import workbench.models
    from workbench.models import clear_cache, load_model
    from workbench.tiny import byte_tokenizer, tiny_llama

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert known_fingerprint(str(folder)) is None  # never loaded: nothing remembered yet
    fp = load_model(str(folder)).fingerprint
    assert known_fingerprint(str(folder)) == fp
    sweep = Sweep.from_dict(
        {
            "models": [str(folder)],
            "suites": [SMALL],
            "pipelines": [{"rtn": {"bits": [8, 4], "group_size": 32, "symmetric": False}}],
        }
    )
    run_sweep(sweep, registry=registry_url)
    clear_cache()

    def no_load(*_a, **_k):
        raise AssertionError("a dry run loaded the weights")

    monkeypatch.setattr(workbench.models, "load_model", no_load)
    plan = run_sweep(sweep, registry=registry_url, dry_run=True)
    assert [i.status for i in plan.items] == ["known", "known"]


def test_worker_urls_are_absolute_and_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert worker_url("sqlite:///runs.db") == f"sqlite:///{tmp_path / 'runs.db'}"
    assert worker_url("postgresql+psycopg://u:p@db/runs") == "postgresql+psycopg://u:p@db/runs"
    with pytest.raises(ConfigError, match="in-memory"):
        worker_url("sqlite://")


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_runs_a_file_prints_the_table_and_exports_it(tmp_path, registry_url, capsys):
    path = _write(
        tmp_path,
        "models: [tiny-llama]\nsuites: [{name: sweep-test, n_tokens: 256, context_length: 64, n_generations: 0}]\n"
        "pipelines:\n  - rtn: {bits: [8, 4], group_size: 32, symmetric: false}\n",
    )
    assert main(["sweep", str(path), "--registry", registry_url, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.count("to run") == 2 and "2 configuration(s): 2 to run." in out.err
    assert _runs(registry_url).empty
    target = tmp_path / "grid.csv"
    assert main(["sweep", str(path), "--registry", registry_url, "--export", str(target)]) == 0
    out = capsys.readouterr()
    assert "8b g32" in out.out and "4b g32" in out.out and "2 done" in out.err
    assert target.read_text().count("\n") == 3 and "kl_mean" in target.read_text()
    assert main(["sweep", str(path), "--registry", registry_url, "--export", str(tmp_path / "x.xlsx")]) == 2
    assert "--export" in capsys.readouterr().err


def test_cli_refuses_a_bad_file_with_one_line(tmp_path, registry_url, capsys):
    path = _write(tmp_path, "models: [tiny-llama]\npipelines:\n  - rtn: {bits: 2..9}\n")
    assert main(["sweep", str(path), "--registry", registry_url]) == 2
    err = capsys.readouterr().err.split("\r")[-1]
    assert err.startswith("error: grid.yaml:3: pipelines[0].rtn: ") and err.count("\n") == 1
    assert main(["sweep", "--registry", registry_url]) == 2
    assert "needs a sweep file" in capsys.readouterr().err


# ---- Ray --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    if os.environ.get("WORKBENCH_SKIP_RAY") == "1":
        pytest.skip("WORKBENCH_SKIP_RAY=1")
    try:
        import ray
    except ImportError:
        pytest.fail("Ray is not installed: pip install 'ray>=2.9' (or set WORKBENCH_SKIP_RAY=1 to skip)")
    start_local_ray(2)  # what run_sweep starts without an address (tried again if Ray's start times out)
    yield ray
    ray.shutdown()


def test_a_ray_sweep_writes_each_run_to_the_shared_registry(ray_instance, registry_url):
    report = run_sweep(_grid(bits=(8, 4)), registry=registry_url, executor="ray")
    assert report.ok, [i.error for i in report.items]
    assert [i.status for i in report.items] == ["done"] * 3
    runs = _runs(registry_url).set_index("run_id")
    baseline = report.items[0].run_id
    assert report.baseline_ids == [baseline] and runs.loc[baseline, "technique"] == "baseline"
    workers = runs.loc[report.run_ids[1:]]
    assert set(workers["status"]) == {"done"} and workers["host"].notna().all()
    assert (workers["metric_kl_mean"] >= 0).all()  # compared with the base outputs computed first
    again = run_sweep(_grid(bits=(8, 4)), registry=registry_url, executor="ray")
    assert [i.reused for i in again.items] == [True, True, True]


def test_a_lost_worker_is_retried_and_a_failing_configuration_is_recorded(
    ray_instance, registry_url, tmp_path
):
    marker = tmp_path / "crashed-once"

    def flaky(model, pipeline, suite, **kwargs):
        from workbench.experiment import run_experiment
        from workbench.techniques import describe_pipeline

        label = describe_pipeline(pipeline)
        if label == "rtn 8b g32" and not marker.exists():
            marker.write_text("x")
            os._exit(1)  # the worker process dies, as on a lost node
        if label == "rtn 3b g32":
            os._exit(1)  # dies every time
        if label == "rtn 4b g32":
            pipeline = [*pipeline, "not a config"]  # the configuration itself is broken
        return run_experiment(model, pipeline, suite, **kwargs)

    sweep = _grid(bits=(8, 4, 3))
    report = run_sweep(sweep, registry=registry_url, executor="ray", runner=flaky, max_retries=1)
    by_label = {i.configuration.label: i for i in report.items}
    assert marker.exists() and by_label["rtn 8b g32"].status == "done"  # retried after the crash
    assert by_label["rtn 3b g32"].status == "failed" and "lost 2 time(s)" in by_label["rtn 3b g32"].error
    assert by_label["rtn 4b g32"].status == "failed" and "not a registered technique config" in (
        by_label["rtn 4b g32"].error
    )
    assert not report.ok and len(report.failed) == 2


# ---- Run as sweep in the lab ---------------------------------------------------------------------------


@pytest.fixture()
def lab(registry_url, tmp_path, monkeypatch):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    made = []

    def build(model):
        bench = Workbench(registry_url, model=model, suite=SUITE, poll_interval=0)
        bench.workspace.load()
        made.append(bench)
        return bench

    yield build
    for bench in made:
        bench.close()


def test_route_run_as_sweep_queues_every_k_with_the_panels_settings(lab):
    from workbench.techniques import make_config

    bench = lab("tiny-moe")
    panel = bench.route
    assert panel.sweep_button.description == "Run as sweep"
    pipelines = bench.workspace.slider_sweep([make_config("route", top_p=0.5)], "route", "k")
    assert [p[0].k for p in pipelines] == [8, 7, 6, 5, 4, 3, 2, 1] and all(
        p[0].top_p is None for p in pipelines
    )
    panel.k.value = 1
    assert bench.jobs.wait(WAIT) and panel.results[-1].status == "done"
    panel.sweep_button.click()
    assert "queued 7, found 1 in the registry" in panel.message.value
    assert bench.jobs.wait(WAIT)
    runs = bench.workspace.runs_frame(technique="route")
    assert sorted(runs["param_k"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert panel.sweep() == []  # everything answered by the registry now
    assert "queued 0, found 8" in panel.message.value


def test_distill_run_as_sweep_trains_a_student_at_every_depth(lab):
    bench = lab("tiny-llama")
    panel = bench.distill
    panel.overrides = {"batch_size": 2, "seq_len": 32, "warmup_steps": 1}
    panel.steps.value = 1
    pipelines = bench.workspace.slider_sweep(panel.pipeline(), "prune", "drop")
    assert [[type(s).__name__ for s in p] for p in pipelines] == [
        ["DistillConfig"],  # depth 0: the whole model is the student
        ["PruneConfig", "DistillConfig"],
    ]
    jobs = panel.sweep()
    assert len(jobs) == 2 and "queued 2, found 0" in panel.message.value
    assert bench.jobs.wait(WAIT)
    assert [r.status for r in panel.results[-2:]] == ["done", "done"]
    assert {r.label.split(" → ")[0] for r in panel.results[-2:]} >= {"prune -1L"}
    panel.sweep()
    assert "queued 0, found 2" in panel.message.value


def test_vary_inserts_and_removes_the_prune_step():
    from workbench.techniques.distill import DistillConfig
    from workbench.techniques.prune_layers import PruneConfig

    distill = DistillConfig(steps=1)
    out = vary([distill], "prune", "drop", [0, 1])
    assert out == [[distill], [PruneConfig(drop=1), distill]]
    kept_width = vary([PruneConfig(drop=1, ffn_size=64), distill], "prune", "drop", [0])
    assert kept_width == [[PruneConfig(drop=0, ffn_size=64), distill]]  # still cuts the FFN width
    with pytest.raises(ConfigError, match="no route step"):
        vary([distill], "route", "k", [1])


# ---- where timings came from -------------------------------------------------------------------------------


def _fill_hosts(url: str) -> None:
    rtn = json.dumps([{"technique": "rtn", "version": 1, "params": {"bits": 4}}])
    with Registry.open(url) as reg:
        for host, device, pipeline in (
            ("laptop", "cpu", "[]"),
            ("laptop", "cpu", rtn),
            ("gpu-box", "cuda:0", rtn),
        ):
            env = {"host": host, "device": device}
            run_id = reg.start_run("fp", "m", pipeline, "x", "quick-key", "quick", env)
            reg.finish_run(
                run_id, {"ppl": 10.0, "kl_mean": 0.01, "bits_per_weight": 4.0, "decode_tok_s": 50.0}
            )


def test_the_runs_frame_says_where_each_run_ran_and_compare_filters_by_host(
    registry_url, tmp_path, monkeypatch
):
    from widgets import Workbench

    monkeypatch.chdir(tmp_path)
    _fill_hosts(registry_url)
    frame = _runs(registry_url)
    assert list(frame["host"]) == ["laptop", "laptop", "gpu-box"]
    assert list(frame["device"]) == ["cpu", "cpu", "cuda:0"]
    bench = Workbench(registry_url, model="tiny-llama", suite="quick", poll_interval=0)
    try:
        compare = bench.compare
        compare.refresh()
        assert [v for _, v in compare.host.options] == ["", "gpu-box", "laptop"]
        assert "2 machines" in compare.host_note.value and "pick one under Host" in compare.host_note.value
        assert compare.hosts_shown() == ["gpu-box", "laptop"]
        compare.host.value = "laptop"
        assert compare.hosts_shown() == ["laptop"] and len(compare.frame) == 2
        assert compare.host_note.value == "" and len(compare.table) == 2
        compare.tag.value = "nothing-has-this"
        assert "All hosts" not in compare.empty_message()  # another filter is to blame
    finally:
        bench.close()
