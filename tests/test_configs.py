"""Technique configs as data: one validation for the weight-grid methods, help per field, labels, built-ins."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from workbench import techniques
from workbench.errors import ConfigError
from workbench.techniques import (
    config_from_dict,
    config_label,
    config_to_dict,
    describe_fields,
    describe_pipeline,
    get_technique,
    make_config,
    pipeline_from_json,
    pipeline_to_json,
    register,
    setting_label,
    technique_names,
)
from workbench.techniques._grid import WeightGridConfig

GRID_METHODS = ("rtn", "gptq", "awq", "mixed")
SHARED = [f.name for f in dataclasses.fields(WeightGridConfig)]


# ---- one validation for the weight-grid configs --------------------------------------------------------------


def test_every_grid_method_shares_the_same_fields_and_defaults():
    for name in GRID_METHODS:
        cls = get_technique(name).config_cls
        assert issubclass(cls, WeightGridConfig), name
        assert cls.technique == name
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert set(SHARED) <= set(fields), name
        # Defaults as they always were: stored pipelines rely on them (mixed starts lower on purpose).
        expected = {
            "bits": 3 if name == "mixed" else 4,
            "group_size": 32,
            "symmetric": False,
            "zero_point": "float",
            "include_embeddings": False,
            "include_head": False,
            "embedding_bits": 8,
        }
        assert {k: fields[k] for k in SHARED} == expected, name


BAD_SHARED = [
    ({"bits": 1}, r"bits=1 is out of range; choose 2 to 8\."),
    ({"bits": 9}, r"bits=9 is out of range; choose 2 to 8\."),
    ({"bits": 4.5}, r"bits=4\.5 is not a whole number; choose 2 to 8\."),
    ({"bits": True}, r"bits=True is not a whole number"),
    ({"group_size": 0}, r"group_size=0 must be -1 \(per-channel\) or at least 2, e.g\. 32 or 64\."),
    ({"group_size": "32"}, r"group_size='32' must be -1"),
    ({"zero_point": "half"}, r"zero_point='half' must be one of 'float', 'int'\."),
    ({"symmetric": "yes"}, r"symmetric='yes' must be True or False\."),
    ({"include_embeddings": 1}, r"include_embeddings=1 must be True or False\."),
    ({"include_head": None}, r"include_head=None must be True or False\."),
    ({"embedding_bits": 12}, r"embedding_bits=12 is out of range; choose 2 to 8\."),
    ({"embedding_bits": 1}, r"embedding_bits=1 is out of range; choose 2 to 8\."),
]


@pytest.mark.parametrize(
    ("params", "message"),
    BAD_SHARED,
    ids=[next(iter(p)) + "=" + repr(next(iter(p.values()))) for p, _ in BAD_SHARED],
)
def test_every_grid_method_refuses_a_bad_shared_value_with_the_same_message(params, message):
    texts = []
    for name in GRID_METHODS:
        with pytest.raises(ConfigError) as err:
            make_config(name, **params)
        texts.append(str(err.value))
        assert str(err.value).startswith(f"{name}: "), str(err.value)
        assert re.search(message, str(err.value)), str(err.value)
    # The same words after the technique's name, for every one of them.
    assert len({t.split(": ", 1)[1] for t in texts}) == 1, texts


def test_good_shared_values_are_accepted_by_every_grid_method():
    for name in GRID_METHODS:
        config = make_config(
            name,
            bits=8,
            group_size=-1,
            symmetric=True,
            zero_point="int",
            include_embeddings=True,
            include_head=True,
            embedding_bits=2,
        )
        assert (config.bits, config.group_size, config.embedding_bits) == (8, -1, 2)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("gptq", {"damp": 1.5}, r"damp=1\.5 must be between 0 and 1"),
        ("gptq", {"damp": "0.1"}, r"damp='0\.1' must be between 0 and 1"),
        ("gptq", {"act_order": "no"}, r"act_order='no' must be True or False"),
        ("gptq", {"seq_len": 4}, r"seq_len=4 must be a whole number of at least 8"),
        ("gptq", {"block_size": 0}, r"block_size=0 must be a whole number of at least 1"),
        ("awq", {"n_samples": 0}, r"n_samples=0 must be a whole number of at least 1"),
        ("awq", {"n_grid": 1}, r"n_grid=1 must be a whole number of at least 2 \(20 as in the paper\)"),
        ("awq", {"search_tokens": 8}, r"search_tokens=8 must be a whole number of at least 16"),
        ("mixed", {"high_bits": 9}, r"high_bits=9 is out of range; choose 2 to 8"),
    ],
)
def test_method_specific_values_are_refused_naming_the_value(name, params, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(name, **params)


def test_a_config_naming_another_technique_is_refused_at_registration():
    @dataclasses.dataclass(frozen=True)
    class Misnamed(WeightGridConfig):
        technique = "rtn"  # a ClassVar inherited from the base; this one claims to be rtn

    with pytest.raises(ValueError, match=r"Misnamed\.technique is 'rtn'; set it to 'not-rtn'"):
        register("not-rtn", Misnamed, kind="quantize")(lambda model, config, ctx: model)


# ---- stored pipelines still load -------------------------------------------------------------------------------


STORED = [  # params exactly as registries hold them (all fields, JSON types)
    {
        "technique": "rtn",
        "version": 1,
        "params": {
            "bits": 3,
            "group_size": 64,
            "symmetric": True,
            "zero_point": "float",
            "include_embeddings": False,
            "include_head": False,
            "embedding_bits": 8,
        },
    },
    {
        "technique": "gptq",
        "version": 1,
        "params": {
            "bits": 4,
            "group_size": 32,
            "symmetric": False,
            "zero_point": "int",
            "act_order": True,
            "damp": 0.01,
            "n_samples": 32,
            "seq_len": 256,
            "block_size": 128,
            "include_embeddings": False,
            "include_head": False,
            "embedding_bits": 8,
        },
    },
    {
        "technique": "awq",
        "version": 1,
        "params": {
            "bits": 4,
            "group_size": 64,
            "symmetric": False,
            "zero_point": "float",
            "n_samples": 64,
            "seq_len": 256,
            "n_grid": 20,
            "search_tokens": 512,
            "clip": True,
            "include_embeddings": False,
            "include_head": False,
            "embedding_bits": 8,
        },
    },
    {
        "technique": "mixed",
        "version": 1,
        "params": {
            "bits": 3,
            "group_size": 32,
            "symmetric": False,
            "zero_point": "float",
            "high_bits": 8,
            "high_precision": ["*.down_proj"],
            "include_embeddings": False,
            "include_head": False,
            "embedding_bits": 8,
        },
    },
    {
        "technique": "bnb",
        "version": 1,
        "params": {"mode": "nf4", "double_quant": False, "compute_dtype": "float32", "int8_threshold": 6.0},
    },
    {"technique": "quanto", "version": 1, "params": {"weights": "int4", "group_size": None}},
]


@pytest.mark.parametrize("stored", STORED, ids=[s["technique"] for s in STORED])
def test_a_stored_config_loads_and_writes_back_the_same_json(stored):
    config = config_from_dict(stored)
    assert config_to_dict(config) == stored
    text = pipeline_to_json([config])
    assert pipeline_from_json(text) == [config]
    assert json.loads(text) == [stored]


# ---- help text per field --------------------------------------------------------------------------------------


def test_every_field_of_every_registered_technique_has_help_text():
    # The techniques the package ships (other test modules register throw-away ones of their own).
    shipped = [
        name
        for name in technique_names()
        if get_technique(name).config_cls.__module__.startswith("workbench.techniques.")
    ]
    missing = [
        f"{name}.{info.name}"
        for name in shipped
        for info in describe_fields(name)
        if len(info.help.strip()) < 10
    ]
    assert not missing, f"fields without help text (add metadata={{'help': ...}}): {', '.join(missing)}"


def test_describe_fields_gives_type_default_help_and_choices_in_order():
    infos = describe_fields("bnb")
    assert [i.name for i in infos] == [f.name for f in dataclasses.fields(get_technique("bnb").config_cls)]
    mode = infos[0]
    assert (mode.name, mode.type, mode.default, mode.choices) == (
        "mode",
        "str",
        "nf4",
        ("nf4", "fp4", "int8"),
    )
    assert "LLM.int8" in mode.help
    gs = {i.name: i for i in describe_fields("quanto")}["group_size"]
    assert gs.type == "int | None" and gs.default is None and gs.choices is None
    zp = {i.name: i for i in describe_fields(make_config("gptq"))}["zero_point"]
    assert zp.choices == ("float", "int") and zp.default == "float"
    assert describe_fields(get_technique("rtn").config_cls) == describe_fields("rtn")


def test_every_declared_choice_is_accepted_and_its_default_is_one_of_them():
    for name in technique_names():
        for info in describe_fields(name):
            if info.choices is None:
                continue
            assert info.default in info.choices, f"{name}.{info.name}"
            for value in info.choices:
                if (name, info.name, value) == ("bnb", "mode", "int8"):
                    value_params = {"mode": "int8"}
                else:
                    value_params = {info.name: value}
                make_config(name, **value_params)


def test_describe_fields_names_an_unknown_technique_and_refuses_a_non_config():
    helps = {i.name: i.help for i in describe_fields("gptq")}
    assert "Hessian" in helps["act_order"]
    with pytest.raises(ConfigError, match="Unknown technique 'gtpq'.*Did you mean 'gptq'"):
        describe_fields("gtpq")
    with pytest.raises(ConfigError, match="not a technique config"):
        describe_fields(3)


# ---- labels each technique defines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "label"),
    [
        ("rtn", {}, "rtn 4b g32"),
        ("rtn", {"bits": 4, "group_size": 64, "symmetric": True}, "rtn 4b g64 sym"),
        ("rtn", {"group_size": -1, "zero_point": "int"}, "rtn 4b per-channel int-zero"),
        (
            "rtn",
            {"include_embeddings": True, "include_head": True, "embedding_bits": 6},
            "rtn 4b g32 +emb+head6",
        ),
        ("gptq", {"bits": 3, "group_size": 64}, "gptq 3b g64"),
        ("gptq", {"bits": 3, "act_order": False, "damp": 0.1}, "gptq 3b g32 act_order=False damp=0.1"),
        ("awq", {"bits": 4, "clip": False}, "awq 4b g32 clip=False"),
        ("mixed", {}, "mixed 3b g32"),
        ("mixed", {"high_precision": ("*.down_proj",)}, "mixed 3b g32 8b:*.down_proj"),
        ("mixed", {"high_bits": 6, "high_precision": ("a.*", "b.*", "c.*")}, "mixed 3b g32 6b:3 patterns"),
        ("bnb", {}, "bnb nf4"),
        ("bnb", {"mode": "fp4", "double_quant": True, "compute_dtype": "bfloat16"}, "bnb fp4 dq bf16"),
        ("bnb", {"mode": "int8", "int8_threshold": 0.0}, "bnb int8 t=0.0"),
        ("quanto", {}, "quanto int4"),
        ("quanto", {"weights": "int2", "group_size": 64}, "quanto int2 g64"),
        ("quanto", {"group_size": -1}, "quanto int4 per-row"),
    ],
)
def test_each_technique_labels_its_own_config(name, params, label):
    assert config_label(make_config(name, **params)) == label


def test_different_settings_of_a_technique_get_different_labels():
    configs = [
        make_config("rtn", bits=b, group_size=g, symmetric=s, zero_point=z)
        for b in (2, 3, 4, 8)
        for g in (32, 64, -1)
        for s in (False, True)
        for z in ("float", "int")
        if not (s and z == "int")
    ]
    configs += [make_config("bnb", mode=m) for m in ("nf4", "fp4", "int8")]
    configs += [make_config("gptq", n_samples=n) for n in (16, 32, 64)]
    labels = [config_label(c) for c in configs]
    assert len(set(labels)) == len(labels), labels


def test_the_setting_label_is_the_label_without_the_technique_name():
    assert setting_label(make_config("rtn", group_size=64, symmetric=True)) == "4b g64 sym"
    assert setting_label(make_config("bnb", double_quant=True)) == "nf4 dq"
    assert setting_label(make_config("quanto", weights="int8")) == "int8"


def test_describe_pipeline_joins_the_stages_labels():
    pipeline = [make_config("rtn", bits=4, group_size=64, symmetric=True), make_config("bnb")]
    assert describe_pipeline(pipeline) == "rtn 4b g64 sym → bnb nf4"
    assert describe_pipeline([]) == "baseline"


def test_a_config_without_its_own_label_shows_its_changed_parameters():
    @dataclasses.dataclass(frozen=True)
    class PlainConfig:
        width: int = dataclasses.field(default=2, metadata={"help": "A width for this test only."})
        name: str = dataclasses.field(default="a", metadata={"help": "A name for this test only."})

    register("plain-test", PlainConfig)(lambda model, config, ctx: model)
    try:
        assert config_label(PlainConfig()) == "plain-test()"
        assert (
            describe_pipeline([PlainConfig(width=3), make_config("bnb")]) == "plain-test(width=3) → bnb nf4"
        )
    finally:  # the name table is global: leave it as the other tests expect it
        from workbench.techniques import base

        del base._TECHNIQUES["plain-test"], base._BY_CONFIG[PlainConfig]


# ---- built-in technique modules --------------------------------------------------------------------------------


def test_a_listed_module_that_is_missing_is_an_import_error_naming_it():
    with pytest.raises(ImportError, match=r"'workbench\.techniques\.no_such_method' failed to import") as err:
        techniques._import_builtin(["rtn", "no_such_method"])
    assert err.value.name == "workbench.techniques.no_such_method"


def test_a_listed_module_that_breaks_on_import_is_an_import_error_naming_it(tmp_path, monkeypatch):
    # A module of the package whose own import fails (a dependency it needs is not there).
    (tmp_path / "broken_method.py").write_text("import a_package_that_is_not_installed_here\n")
    monkeypatch.setattr(techniques, "__path__", [*techniques.__path__, str(tmp_path)])
    with pytest.raises(
        ImportError,
        match=r"'workbench\.techniques\.broken_method' failed to import: No module "
        r"named 'a_package_that_is_not_installed_here'",
    ):
        techniques._import_builtin(["broken_method"])


def test_every_technique_file_is_listed_and_every_listed_one_registers():
    folder = Path(techniques.__file__).parent
    # A technique file registers at module level (a line starting with ``@register(``); docstrings indent it.
    registering = sorted(
        p.stem for p in folder.glob("*.py") if re.search(r"^@register\(", p.read_text(), re.MULTILINE)
    )
    assert sorted(techniques.BUILTIN) == registering
    assert {get_technique(n).apply.__module__.rsplit(".", 1)[-1] for n in technique_names()} >= set(
        registering
    )


def test_an_optional_backend_that_is_missing_still_registers_its_technique():
    # bnb and quanto import their packages only when used, so they are always registered.
    assert {"bnb", "quanto"} <= set(technique_names("quantize"))


def test_fields_added_later_are_stored_only_when_set():
    """Runs recorded before a field existed keep matching: the field is left out of the JSON at its default."""
    from workbench.techniques.gptq import GPTQConfig

    assert "module_bits" not in config_to_dict(GPTQConfig())["params"]
    mapped = GPTQConfig(module_bits=(("*.v_proj", 8),))
    stored = config_to_dict(mapped)
    assert stored["params"]["module_bits"] == [["*.v_proj", 8]]
    assert config_from_dict(stored) == mapped
    assert "data" not in config_to_dict(make_config("distill"))["params"]
