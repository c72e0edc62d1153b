"""Config files: shipped configs load, dumps read back, every rejection is one clear line."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlp.config import (
    Config,
    DescriptorConfig,
    SelectionConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    with_overrides,
)
from lmlp.descriptors import SymmetryFunctions
from lmlp.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def rejected(data, source: str = "x.yaml") -> str:
    """The one-line message with which ``data`` is rejected."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{source}: ")
    return message


def test_shipped_full_config_is_the_published_protocol():
    cfg = load_config(CONFIGS / "sn2.yaml")
    assert cfg.ensemble.members == 10 and cfg.selection.fit_fraction == 0.0828  # 720 of 8704 structures
    assert cfg.data.path == "data/sn2_gfn2xtb_augmented.h5"
    assert cfg.training.epochs == 2000
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.params) == ("core", 1e-2, {"p_frozen": 0.1})
    assert SymmetryFunctions.from_config(cfg.descriptor).n_functions == 132 and cfg.descriptor.cutoff == 12.0
    assert (cfg.training.steps_per_epoch, cfg.training.validation_every) == (2, 5)
    assert cfg.descriptor == DescriptorConfig()  # configs that leave it out get the same descriptor
    for name in ("sn2-fcl.yaml", "sn2-continued.yaml"):
        assert load_config(CONFIGS / name).training.steps_per_epoch == 2
    assert cfg.run_dir == Path("runs/sn2")


def test_shipped_quick_config_loads():
    cfg = load_config(CONFIGS / "sn2-quick.yaml")
    assert cfg.name == "sn2-quick" and cfg.run_dir == Path("runs/sn2-quick")
    assert cfg.ensemble.members < 10 and cfg.training.epochs < 2000
    assert cfg.optimizer == load_config(CONFIGS / "sn2.yaml").optimizer


def test_default_descriptor_has_72_radial_and_60_angular_functions():
    sf = SymmetryFunctions.from_config(DescriptorConfig())
    assert (sf.n_radial, sf.n_functions) == (72, 132)


def test_plain_acsf_count_depends_on_elements():
    d = DescriptorConfig(kind="acsf")
    assert SymmetryFunctions.from_config(d, [1, 6]).n_functions == 24 * 2 + 12 * 3


def test_a_descriptor_that_cannot_be_built_is_rejected():
    """Type 0 has no "difference" pair weight: no angular kind is left, and SymmetryFunctions
    cannot be built, so the config must not pass."""
    message = rejected({"descriptor": {"angular_types": [0], "angular_pair_weights": ["difference"]}})
    assert "x.yaml: descriptor: these parameters give no valid symmetry functions" in message
    assert '"difference" is left out for type 0' in message
    message = rejected({"descriptor": {"radial_eta": [], "radial_rs": [], "angular_eta": []}})
    assert "x.yaml: descriptor: no symmetry functions" in message


@pytest.mark.parametrize("cfg", [Config(), load_config(CONFIGS / "sn2.yaml")])
def test_dump_reads_back_to_an_equal_config(cfg):
    cfg.optimizer.params = {"p_frozen": 0.1, "t_hist": 250, "betas": [0.9, 0.999], "amsgrad": True}
    cfg.data.reactions = ["F+CH3Cl", "Cl+CH3F"]
    text = dump_config(cfg)
    assert config_from_dict(yaml.safe_load(text), "dump") == cfg
    assert "max_structures: null" in text  # every default is written out


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_config(tmp_path / "empty.yaml") == Config()
    assert config_from_dict({"model": None}) == Config()


def test_exponent_without_dot_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("optimizer:\n  lr: 1e-3\n")
    assert load_config(tmp_path / "c.yaml").optimizer.lr == 1e-3


def test_int_is_accepted_for_float():
    cfg = config_from_dict({"descriptor": {"cutoff": 13}, "training": {"energy_weight": 0}})
    assert cfg.descriptor.cutoff == 13.0 and isinstance(cfg.descriptor.cutoff, float)


def test_bool_is_rejected_for_int():
    message = rejected({"ensemble": {"members": True}})
    assert "ensemble.members: got True, expected an integer >= 1" in message


def test_wrong_type_names_key_value_and_type():
    message = rejected({"training": {"epochs": "many"}})
    assert message == "x.yaml: training.epochs: got 'many', expected an integer >= 1"


def test_out_of_range_names_the_limit():
    assert rejected({"training": {"epochs": -3}}) == "x.yaml: training.epochs: got -3, expected an integer >= 1"
    message = rejected({"selection": {"fit_fraction": 1.5}})
    assert "selection.fit_fraction: got 1.5, expected a number > 0 and <= 1" in message


def test_list_elements_are_range_checked():
    message = rejected({"descriptor": {"radial_types": [0, 1, 7]}})
    assert "descriptor.radial_types[2]: got 7, expected an integer >= 0 and <= 6" in message
    message = rejected({"descriptor": {"angular_lambda": [-1, 0.5]}})
    assert "descriptor.angular_lambda[1]: got 0.5, expected -1 or 1" in message


def test_unknown_key_lists_allowed_keys_and_suggests():
    message = rejected({"model": {"activaton": "tanh"}})
    assert "model.activaton: unknown key; allowed keys: hidden, activation" in message
    assert "did you mean 'activation'?" in message
    assert "x.yaml: colour: unknown key" in rejected({"colour": "red"})
    assert "did you mean" not in rejected({"colour": "red"})
    assert "x.yaml: model.'two\\nlines': unknown key" in rejected({"model": {"two\nlines": 1}})


def test_bad_literal_lists_allowed_values():
    message = rejected({"optimizer": {"name": "adamw"}})
    assert "optimizer.name: got 'adamw', expected one of 'core', 'adam'," in message and "'rprop'" in message
    assert "did you mean 'adam'?" in message


def test_non_mapping_section_is_rejected():
    message = rejected({"training": [1, 2]})
    assert "training: got [1, 2], expected a mapping with keys epochs, steps_per_epoch" in message


def test_top_level_must_be_a_mapping():
    assert "x.yaml: top level: got ['a'], expected a mapping with keys name, descriptor" in rejected(["a"])


def test_optional_value_allows_null_and_says_so():
    assert config_from_dict({"data": {"max_structures": None}}).data.max_structures is None
    message = rejected({"data": {"max_structures": 0}})
    assert "data.max_structures: got 0, expected an integer >= 1 or null" in message


def test_optimizer_params_accept_numbers_bools_and_number_lists_only():
    params = {"p_frozen": 0.1, "t_hist": 250, "nesterov": True, "betas": [0.9, 0.999]}
    assert config_from_dict({"optimizer": {"params": params}}).optimizer.params == params
    assert "optimizer.params.mode: got 'fast'" in rejected({"optimizer": {"params": {"mode": "fast"}}})
    assert "optimizer.params.betas[1]: got None, expected a number" in rejected(
        {"optimizer": {"params": {"betas": [0.9, None]}}}
    )


def test_selection_weights_must_be_ordered():
    message = rejected({"selection": {"p_max": 5.0}})
    assert "selection.p_new: got 10.0, expected p_min <= p_new <= p_max (0.1 ... 5.0)" in message
    assert "selection.p_init: got 0.05" in rejected({"selection": {"p_init": 0.05}})
    with pytest.raises(ConfigError, match=r"^p_init: "):
        SelectionConfig(p_init=20.0).validate()


def test_radial_lists_must_pair_up():
    message = rejected({"descriptor": {"radial_rs": [1.0, 2.0]}})
    assert "descriptor.radial_rs: got [1.0, 2.0], expected 24 values, one per radial_eta" in message


def test_repeated_list_entries_are_rejected():
    assert "descriptor.angular_zeta: got [1, 1], expected a list without repeated values" in rejected(
        {"descriptor": {"angular_zeta": [1, 1]}}
    )


def test_non_finite_number_is_rejected():
    assert "descriptor.cutoff: got inf, expected a finite number" in rejected({"descriptor": {"cutoff": float("inf")}})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: no such file$"):
        load_config(tmp_path / "absent.yaml")


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ntraining:\n  epochs: [1, 2\n  seed: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(path))}: line \d+, column \d+: invalid YAML: ", message)


def test_repeated_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("training:\n  epochs: 10\n  epochs: 20\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 3, column 3: invalid YAML: duplicate key 'epochs'"):
        load_config(path)


def test_error_in_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: -3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: training\.epochs: got -3"):
        load_config(path)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_yamlish = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_near_valid = st.integers(-2, 12) | st.floats(-2, 12) | st.lists(st.integers(-2, 8) | st.floats(-2, 8), max_size=9)


def _value(f: dataclasses.Field) -> st.SearchStrategy:
    """The field's default, a nearby number or list, or arbitrary YAML-like data."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
        return _section(type(default)) | _yamlish
    return st.just(default) | _near_valid | _yamlish


def _section(cls: type) -> st.SearchStrategy:
    """Mappings with some of the keys of dataclass ``cls`` (and now and then a stray key)."""
    fields = {f.name: _value(f) for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries({}, optional=fields) | st.dictionaries(st.text(max_size=6), _yamlish, max_size=2)


@settings(max_examples=200, deadline=None)
@given(data=_section(Config) | _yamlish)
def test_arbitrary_data_gives_config_or_config_error(data):
    try:
        assert isinstance(config_from_dict(data, "h.yaml"), Config)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("h.yaml: ")


def test_names_and_defaults_come_from_their_one_source():
    """Optimizer and activation names are those of the registries, and evaluate_model's loss
    weights the training defaults: a change there reaches the config and the API."""
    import subprocess
    import sys

    code = "\n".join([
        "import inspect, lmlp.model, lmlp.optim",
        "lmlp.model.ACTIVATION_CODES['gelu'] = 99",
        "lmlp.optim.OPTIMIZERS = (*lmlp.optim.OPTIMIZERS, 'lion')",
        "import lmlp.config",
        "cfg = lmlp.config.config_from_dict({'model': {'activation': 'gelu'}, 'optimizer': {'name': 'lion'}})",
        "lmlp.config.TrainingConfig.energy_weight = 3.0",
        "import lmlp.metrics",
        "print(cfg.model.activation, cfg.optimizer.name,",
        "      inspect.signature(lmlp.metrics.evaluate_model).parameters['q'].default)",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gelu", "lion", "3.0"]


def test_set_overrides_keys_of_a_config_file():
    overrides = parse_overrides(["data.max_train=100", "optimizer.params={p_frozen: 0}", "name=x", "data.reactions=null"])
    assert overrides == {"data.max_train": 100, "optimizer.params": {"p_frozen": 0}, "name": "x", "data.reactions": None}
    cfg = load_config(CONFIGS / "sn2.yaml", overrides)
    assert (cfg.data.max_train, cfg.optimizer.params, cfg.name) == (100, {"p_frozen": 0}, "x")
    assert cfg.descriptor == load_config(CONFIGS / "sn2.yaml").descriptor  # the rest of the file stays
    base = {"data": {"path": "a.h5"}}
    assert with_overrides(base, {"data.max_train": 5, "training.epochs": 3}) == {
        "data": {"path": "a.h5", "max_train": 5}, "training": {"epochs": 3}}
    assert base == {"data": {"path": "a.h5"}}  # a copy


@pytest.mark.parametrize(("item", "message"), [
    ("data.max_trian=5", "with --set data.max_trian: data.max_trian: unknown key; "),
    ("foo", "--set 'foo': expected KEY=VALUE, e.g. data.max_train=100"),
    ("=3", "--set '=3': expected KEY=VALUE"),
    ("name=[1", "--set 'name=[1': the value is not valid YAML"),
    ("name.x=1", "--set name.x: name is not a section"),
])
def test_bad_set_overrides_are_one_line_errors(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "sn2.yaml", parse_overrides([item]))
    assert message in str(info.value) and "\n" not in str(info.value)
