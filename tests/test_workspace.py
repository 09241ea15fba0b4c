"""The workspace and the parameter spaces under the panels and the CLI: spaces, the queue, the decisions."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest

from workbench.errors import ConfigError
from workbench.evaluate import Suite
from workbench.jobs import JobQueue
from workbench.techniques import apply_, make_config
from workbench.techniques.space import (
    field_help,
    grid_favours,
    group_sizes_for,
    parameter_space,
    space_names,
)
from workbench.tiny import tiny_llama
from workbench.workspace import NO_REGISTRY, Workspace

WAIT = 60
SUITE = Suite("ws-test", n_tokens=128, context_length=64, n_generations=0, speed=False)


# ---- parameter spaces ---------------------------------------------------------------------------------------


def test_every_quantizer_declares_a_space():
    assert {"rtn", "gptq", "awq", "mixed", "bnb", "quanto"} <= set(space_names())


@pytest.mark.parametrize(
    ("name", "bits", "labels"),
    [
        ("rtn", (2, 3, 4, 5, 6, 7, 8), {}),
        ("gptq", (2, 3, 4, 5, 6, 7, 8), {}),
        ("bnb", (4, 8), {4: "nf4", 8: "int8"}),
        ("quanto", (2, 4, 8), {2: "int2", 4: "int4", 8: "int8"}),
    ],
)
def test_a_space_offers_the_widths_its_technique_takes(name, bits, labels):
    space = parameter_space(name)
    assert space.bits == bits and dict(space.labels) == labels
    for b in bits:
        assert space.config(bits=b).bits == b


def test_format_widths_map_to_their_formats_and_others_are_refused_with_the_list():
    bnb = parameter_space("bnb")
    assert [c.mode for c in bnb.sweep(bits=[8, 4])] == ["int8", "nf4"]
    assert bnb.config(bits=4, double_quant=True).double_quant
    with pytest.raises(ConfigError, match=r"takes 4 \(nf4\), 8 \(int8\) bits, not 3"):
        bnb.config(bits=3)
    with pytest.raises(ConfigError, match="not both"):
        bnb.config(bits=4, mode="fp4")
    quanto = parameter_space("quanto")
    assert [c.weights for c in quanto.sweep()] == ["int8", "int4", "int2"]


def test_config_maps_the_axes_and_the_default_point_fills_the_rest():
    space = parameter_space("rtn")
    assert space.default == {"bits": 4, "group_size": 32, "symmetric": False}
    config = space.config(bits=4, group_size=64, symmetric=True)
    assert (config.bits, config.group_size, config.symmetric) == (4, 64, True)
    assert space.config(bits=3) == make_config("rtn", bits=3)
    with pytest.raises(ConfigError, match="out of range"):
        space.config(bits=9)
    with pytest.raises(ConfigError, match="unknown parameter"):
        parameter_space("bnb").config(bits=4, group_size=64)


def test_a_sweep_fails_as_a_whole_before_returning_any_config():
    with pytest.raises(ConfigError, match="not 6"):
        parameter_space("quanto").sweep(bits=[8, 6, 4])


def test_group_sizes_are_those_every_decoder_linear_takes():
    # The demo model's widths (576 and 1536): 128 does not divide 576, 288 and 576 do not divide 1536.
    assert group_sizes_for([576, 1536]) == (32, 64, 96, 192, -1)
    assert group_sizes_for([576]) == (32, 64, 96, 192, 288, 576, -1)
    assert group_sizes_for([24, 48]) == (8, 12, 24, -1)  # narrower than 32: smaller divisors
    space = parameter_space("rtn", tiny_llama(hidden_size=96, layers=1))  # widths 96 and 192
    assert space.group_sizes == (32, 96, -1) and space.model_widths == (96, 192)
    assert space.default["group_size"] == 32


def test_a_model_that_does_not_take_the_default_group_starts_at_one_it_takes():
    space = parameter_space("rtn", tiny_llama(hidden_size=48, layers=1))  # widths 48 and 96
    assert space.group_sizes == (8, 12, 16, 24, 48, -1) and space.default["group_size"] == 8


def test_the_default_avoids_a_grid_the_weights_sit_on_and_says_why():
    on_grid = apply_(tiny_llama(), make_config("rtn", bits=4, group_size=32))  # Q4_1-style, as the demo model
    space = parameter_space("rtn", on_grid)
    assert space.grid is not None and (space.grid.bits, space.grid.group_size) == (4, 32)
    assert space.default == {"bits": 4, "group_size": 64, "symmetric": False}
    assert "4-bit grid" in space.reason and "group size 64" in space.reason.lower()
    assert not grid_favours(space.grid, **space.default)
    assert grid_favours(space.grid, 4, 32, False) and grid_favours(space.grid, 8, 32, False)
    assert not grid_favours(space.grid, 4, 32, True) and not grid_favours(space.grid, 3, 32, False)
    plain = parameter_space("rtn", tiny_llama())
    assert plain.grid is None and plain.reason == "" and plain.default["group_size"] == 32
    # A format-based technique keeps its own format on any grid.
    assert parameter_space("quanto", on_grid).reason == ""


def test_without_a_larger_group_the_default_turns_symmetric():
    model = apply_(tiny_llama(hidden_size=32, layers=1), make_config("rtn", bits=4, group_size=32))
    space = parameter_space("rtn", model)
    assert space.group_sizes == (32, -1)
    assert space.default == {"bits": 4, "group_size": 32, "symmetric": True} and "symmetric" in space.reason


@pytest.mark.slow
def test_the_demo_models_space_offers_its_group_sizes_and_a_default_off_its_grid():
    from workbench.models import load_model

    space = parameter_space("rtn", load_model("demo").model)
    assert space.group_sizes == (32, 64, 96, 192, -1)
    assert space.default["group_size"] != 32 or space.default["symmetric"]
    assert space.reason


def test_field_help_reads_metadata_first_then_the_docstring():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        """Summary line: not a field.

        alpha: from the docstring,
            continued here.
        beta, gamma: shared text.
        """

        alpha: int = 1
        beta: float = dataclasses.field(default=0.5, metadata={"help": "from metadata"})
        gamma: str = "x"
        delta: bool = False

    helps = {f.name: f.help for f in field_help(Cfg)}
    assert helps == {
        "alpha": "from the docstring, continued here.",
        "beta": "from metadata",
        "gamma": "shared text.",
        "delta": "",
    }
    rtn = {f.name: f for f in field_help("rtn")}
    assert "per-channel" in rtn["group_size"].help and rtn["bits"].default == 4
    assert "nf4" in parameter_space("bnb").help["mode"]


def test_a_technique_without_a_space_says_how_to_use_it_instead():
    from workbench.techniques import base as tbase

    @dataclasses.dataclass(frozen=True)
    class _NoSpace:
        """No width."""

        n: int = 1

    if "test-nospace" not in tbase._TECHNIQUES:
        tbase.register("test-nospace", _NoSpace)(lambda m, c, ctx: m)
    with pytest.raises(ConfigError, match="declares no parameter space"):
        parameter_space("test-nospace")
    with pytest.raises(ConfigError, match="Unknown technique"):
        parameter_space("rnt")


# ---- the queue ----------------------------------------------------------------------------------------------


def test_the_queue_returns_the_same_job_for_the_same_key_and_cancels_everything_at_once():
    queue = JobQueue()
    started, gate = threading.Event(), threading.Event()

    def hold(progress):
        started.set()
        while not gate.wait(0.01):
            progress.check()  # raises once cancelled

    first = queue.submit(hold, key="a")
    assert started.wait(WAIT)
    assert queue.submit(lambda _p: 1, key="a") is first
    queued = [queue.submit(lambda _p, i=i: i, key=("b", i)) for i in range(3)]
    cancelled = queue.cancel_all()
    assert set(cancelled) == {first, *queued}
    assert queue.wait(WAIT)
    assert [j.status for j in [first, *queued]] == ["cancelled"] * 4
    assert queue.submit(lambda _p: 7, key="a").wait(WAIT)  # a cancelled key may be queued again
    queue.close()


# ---- the workspace -----------------------------------------------------------------------------------------


@pytest.fixture()
def ws(registry_url):
    workspace = Workspace(registry_url, model="tiny-llama", suite=SUITE)
    yield workspace
    workspace.close()


def test_a_run_queued_twice_is_one_job_and_then_answers_from_the_registry(ws):
    config = make_config("rtn", bits=3)
    assert ws.answer_now([config]) is None  # no model loaded yet: nothing to look up
    first = ws.submit_run([config])
    assert ws.submit_run([config]) is first
    assert ws.queue.wait(WAIT) and first.result.status == "done" and not first.result.reused
    assert ws.fingerprint is not None
    found = ws.answer_now([config])
    assert found is not None and found.reused and found.run_id == first.result.run_id
    assert ws.last_result is found


def test_settings_the_loaded_model_cannot_take_are_refused_at_once(ws):
    ws.load()
    with pytest.raises(ConfigError, match="does not divide"):
        ws.answer_now([make_config("rtn", group_size=128)])  # tiny-llama's layers are 64 and 128 wide
    with pytest.raises(ConfigError, match="does not divide"):
        ws.sweep_configs("rtn", bits=[4], group_size=128)
    assert ws.space("rtn").group_sizes == (32, 64, -1)  # what a dropdown offers for it


def test_the_space_follows_the_loaded_model_and_listeners_hear_of_it(ws):
    heard = []
    ws.on_model_loaded(heard.append)
    assert ws.space("rtn").group_sizes == (32, 64, 128, -1)  # before loading: the generic choices
    loaded = ws.load()
    assert heard == [loaded] and ws.load() is loaded and heard == [loaded]
    assert ws.space("rtn").model_widths == (64, 128)
    ws.model_spec = "tiny-moe"
    assert ws.loaded_model() is None and ws.space("rtn").model_widths == ()


def test_the_grid_is_detected_once_per_model_and_moves_the_default(ws, monkeypatch):
    import workbench.quant_analysis as qa

    loaded = copy.copy(ws.load())
    loaded.model = apply_(copy.deepcopy(loaded.model), make_config("rtn", bits=4, group_size=32))
    loaded.fingerprint = "on-grid"
    ws._set_loaded(loaded)
    calls = []
    real = qa.detect_grid
    monkeypatch.setattr(qa, "detect_grid", lambda m: calls.append(1) or real(m))
    assert ws.space("rtn").default["group_size"] == 64 and ws.space("gptq").reason
    assert len(calls) == 1


def test_no_registry_says_what_to_do_and_one_can_be_opened_later(registry_url):
    ws = Workspace(NO_REGISTRY, model="tiny-llama")
    try:
        with pytest.raises(ConfigError, match="No registry is open"):
            ws.submit_run([])
        assert not ws.queue.history and not ws.has_registry
        ws.open_registry(registry_url)
        assert ws.registry_url.endswith("runs.db") and ws.runs_frame().empty
    finally:
        ws.close()


def test_cancel_queue_stops_the_current_run_and_drops_the_rest(ws):
    gate = threading.Event()
    ws.queue.submit(lambda _p: gate.wait(WAIT), label="hold")
    jobs = [ws.submit_run([make_config("rtn", bits=b)]) for b in (8, 4)]
    assert len(ws.cancel_queue()) == 3
    gate.set()
    assert ws.queue.wait(WAIT)
    assert [j.status for j in jobs] == ["cancelled", "cancelled"]
    assert ws.runs_frame(status=None).empty
