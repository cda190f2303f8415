"""Every option is declared once (caer/config.py): the CLI flags and the config-file keys come from that one
declaration, and both are checked against the same choices and ranges."""

from __future__ import annotations

import re

import pytest
import typer
import yaml

from caer.cli import app
from caer.config import (
    CONFIG_DIR,
    EVAL_OVERRIDES,
    EvalConfig,
    ExtractConfig,
    Optimizer,
    RunConfig,
    from_flat,
    load_config,
    option_type,
    options,
    to_flat,
)
from caer.model.checkpoint import checkpoint_config
from conftest import assert_in_output, run_cli

COMMAND = typer.main.get_command(app)
META_FLAGS = {"help", "config"}  # --help, and train's --config FILE


def flag_names(command: str) -> list[str]:
    return [p.name for p in COMMAND.commands[command].params if p.name not in META_FLAGS]


def option_names(record) -> list[str]:
    return [f.name for f, _ in options(record)]


@pytest.mark.parametrize("command, names", [
    ("train", option_names(RunConfig)),
    ("extract", option_names(ExtractConfig)),
    ("eval", option_names(EvalConfig) + list(EVAL_OVERRIDES)),
])
def test_every_option_has_exactly_one_flag_and_every_flag_an_option(command, names):
    flags = flag_names(command)
    assert len(names) == len(set(names)), "an option name is declared twice in one record"
    assert sorted(flags) == sorted(names)


def test_shared_options_are_one_declaration():
    """Extraction and training crop frames from the same declaration of margin, crop-body, boxes, stride."""
    train = {f.name: f for f, _ in options(RunConfig)}
    extract = {f.name: f for f, _ in options(ExtractConfig)}
    for name in ("margin", "crop_body", "face_boxes", "body_boxes", "frame_stride", "root", "model", "pretrained",
                 "device", "use_amp", "workers"):
        assert train[name] is extract[name], name


def test_each_option_is_a_config_file_key_too(tmp_path):
    """Every run option round-trips through a YAML file under its own name."""
    defaults = to_flat(load_config("tiny"))
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(defaults))
    assert to_flat(load_config(path)) == defaults
    assert set(defaults) == set(option_names(RunConfig))


def test_help_lists_the_choices_and_the_declared_defaults():
    result = run_cli(["train", "--help"])
    assert result.exit_code == 0
    for text in ("--optimizer", "sgd|adamw", "--iec-base", "desc|soft", "--lambda-mi", "default: (0.2)"):
        assert_in_output(text, result.output)
    spellings = {p.name: p.opts + p.secondary_opts for p in COMMAND.commands["train"].params}
    assert spellings["class_specific_contexts"] == ["--class-specific-contexts", "--shared-contexts"]
    assert spellings["lambda_mi"] == ["--lambda-mi", "--lambda_mi"]


@pytest.mark.parametrize("args, valid", [
    (["train", "--optimizer", "adam"], ("sgd", "adamw")),
    (["train", "--iec-base", "mixed"], ("desc", "soft")),
    (["train", "--streams", "faces"], ("both", "face", "context")),
    (["extract", "a.txt", "-o", "c.zarr", "--format", "npz"], ("auto", "zarr", "h5")),
    (["eval", "ckpt.pt", "--tta", "mirror"], ("none", "flip")),
])
def test_a_wrong_choice_gets_the_parsers_error_listing_the_valid_values(args, valid):
    result = run_cli(args)
    assert result.exit_code == 2  # click's usage error, before anything runs
    assert_in_output("Invalid value", result.output)
    for value in valid:
        assert value in result.output


@pytest.mark.parametrize("args, fragment", [
    (["train", "--stage", "4"], "'--stage': Input should be less than or equal to 3"),
    (["train", "--label-smoothing", "1.5"], "'--label-smoothing': Input should be less than or equal"),
    (["train", "--batch-size", "0"], "'--batch-size': Input should be greater than or equal to 1"),
    (["extract", "a.txt", "-o", "c.zarr", "--views", "3"], "'--views': Input should be less than or equal to 2"),
])
def test_a_value_out_of_range_is_refused_by_the_parser(args, fragment):
    result = run_cli(args)
    assert result.exit_code == 2
    assert_in_output(fragment, result.output)


@pytest.mark.parametrize("key, value, fragment", [
    ("optimizer", "adam", "'adam' is not one of sgd, adamw"),
    ("stage", 4, "stage: 4 is outside 1..3"),
    ("lr", "fast", "lr: expected float, got 'fast'"),
    ("epochs", 2.5, "epochs: expected int, got 2.5"),
    ("adapter", "yes", "adapter: expected bool, got 'yes'"),
    ("learning_rate", 0.1, "unknown option 'learning_rate'"),
])
def test_a_config_file_gets_the_same_checks_naming_file_and_key(tmp_path, key, value, fragment):
    path = tmp_path / "bad.yaml"
    tiny = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    path.write_text(yaml.safe_dump(tiny | {key: value}))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(path) in str(err.value) and fragment in str(err.value)
    result = run_cli(["train", "-c", str(path)])  # and the CLI says it in one line, exit code 2
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(fragment, result.output)


def tiny_with(path, text: str):
    """Write configs/tiny.yaml to ``path`` with the keys of ``text`` (YAML lines, kept as written) set by ``text``."""
    keys = {line.split(":")[0] for line in text.splitlines()}
    kept = [line for line in (CONFIG_DIR / "tiny.yaml").read_text().splitlines() if line.split(":")[0] not in keys]
    path.write_text("\n".join([*kept, text]) + "\n")
    return path


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    path = tiny_with(tmp_path / "exp.yaml", "lr_image_encoder: 1e-5")
    assert load_config(path).optim.lr_image_encoder == 1e-5


def test_choices_are_enums_in_the_config():
    cfg = load_config("tiny", {"optimizer": "sgd"})
    assert cfg.optim.optimizer is Optimizer.sgd
    assert to_flat(cfg)["optimizer"] == "sgd" and type(to_flat(cfg)["optimizer"]) is str  # plain in files


def test_checkpoint_configs_of_older_versions_still_load():
    """A checkpoint stores the flat config; keys this version no longer declares are dropped, not fatal."""
    saved = to_flat(load_config("tiny")) | {"retired_option": 3, "optimizer": "adamw"}
    cfg = checkpoint_config({"config": saved}, {"batch_size": 3})
    assert cfg.optim.optimizer is Optimizer.adamw and cfg.optim.batch_size == 3
    with pytest.raises(ValueError, match="'rmsprop' is not one of sgd, adamw"):
        checkpoint_config({"config": saved | {"optimizer": "rmsprop"}})


def test_a_required_flag_or_argument_is_named_when_missing():
    result = run_cli(["extract", "a.txt"])
    assert result.exit_code == 2
    assert_in_output("--out", result.output)
    assert COMMAND.commands["extract"].params[0].param_type_name == "argument"
    assert from_flat(ExtractConfig, {"annotations": ["a.txt"], "out": "c.zarr"}).crop.resolved().margin == 20.0


# every numeric option found unchecked by the hostile-user pass of issue 10, refused before any work starts
HOSTILE = [("lr", "-0.1"), ("lambda_mi", "-5"), ("num_frames", "0"), ("grad_accum", "0"), ("label_smoothing", "2"),
           ("temperature", "0"), ("margin", "-50"), ("batch_size", "0"), ("epochs", "-1"), ("dropout", "1.5")]


@pytest.mark.parametrize("name, value", HOSTILE)
def test_out_of_range_values_are_refused_as_flags_and_as_config_keys(name, value, tmp_path):
    flag = "--" + name.replace("_", "-")
    result = run_cli(["train", "-c", "tiny", flag, value])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"Invalid value for '{flag}'", result.output)
    path = tiny_with(tmp_path / "bad.yaml", f"{name}: {value}")
    result = run_cli(["train", "-c", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    shown = yaml.safe_load(value)  # the value as the file holds it: an int for "0", a float for "-0.1"
    declared = next(f for f, _ in options(RunConfig) if f.name == name)
    shown = float(shown) if option_type(declared) is float else shown
    assert_in_output(f"{path}: {name}: {shown} is outside", result.output)


def test_extract_batch_size_zero_is_refused_by_the_parser():
    result = run_cli(["extract", "a.txt", "-o", "c.zarr", "--batch-size", "0"])
    assert result.exit_code == 2
    assert_in_output("Invalid value for '--batch-size'", result.output)


def assert_config_refused(path, fragment: str) -> None:
    """``load_config`` and ``caer train -c`` both refuse ``path`` with one line holding ``fragment``."""
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert fragment in str(err.value), str(err.value)
    result = run_cli(["train", "-c", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(fragment, result.output)


@pytest.mark.parametrize("key, expected", [
    ("epochs", "int"), ("lr", "float"), ("stage", "int"), ("classes", "a list of str"),
    ("streams", "one of both, face, context"), ("use_amp", "bool"),
])
def test_null_is_refused_where_the_option_cannot_be_unset(tmp_path, key, expected):
    path = tiny_with(tmp_path / "null.yaml", f"{key}: null")
    assert_config_refused(path, f"{path}: {key}: null is not allowed (expected {expected})")


def test_null_unsets_an_option_that_may_be_unset(tmp_path):
    cfg = load_config(tiny_with(tmp_path / "null.yaml", "workers: null\nepochs_stage1: ~"))
    assert cfg.runtime.workers is None and cfg.stages.epochs_stage1 is None


@pytest.mark.parametrize("line, fragment", [
    ("lr: {a: 1}", "lr: expected float, got {'a': 1}"),
    ("lr: [0.1]", "lr: expected float, got [0.1]"),
    ("epochs: [3]", "epochs: expected int, got [3]"),
    ("model: {name: ViT}", "model: expected str, got {'name': 'ViT'}"),
    ("classes: [a, [b]]", "classes: expected a list of str, got ['a', ['b']]"),
    ("lr: true", "lr: expected float, got True"),
    ("run_dir: yes", "run_dir: expected str, got True (YAML reads unquoted yes, no, on, off as booleans"),
    ("classes: [a, off, c]", "classes: expected a list of str, got ['a', False, 'c'] (YAML reads unquoted yes"),
    ("lr: .nan", "lr: nan is not a finite number"),
    ("temperature: .inf", "temperature: inf is not a finite number"),
    ("adapter_scale: -.inf", "adapter_scale: -inf is not a finite number"),
    ("logit_adj_tau: nan", "logit_adj_tau: nan is not a finite number"),
])
def test_a_value_of_another_shape_or_a_non_finite_float_is_refused(tmp_path, line, fragment):
    """A mapping or list where a value belongs; a boolean, NaN or infinity for a float; a boolean for a text (the
    hint to quote it only there)."""
    path = tiny_with(tmp_path / "value.yaml", line)
    assert_config_refused(path, f"{path}: {fragment}")
    assert ("quote the text" in str(pytest.raises(ValueError, load_config, path).value)) == ("YAML reads" in fragment)


@pytest.mark.parametrize("args, fragment", [
    (["train", "-c", "tiny", "--lr", "inf"], "--lr: inf is not a finite number"),
    (["train", "-c", "tiny", "--temperature", "inf"], "--temperature: inf is not a finite number"),
    (["train", "-c", "tiny", "--adapter-scale", "nan"], "--adapter-scale: nan is not a finite number"),
    (["train", "-c", "tiny", "--logit-adj-tau", "nan"], "--logit-adj-tau: nan is not a finite number"),
    (["extract", "a.txt", "-o", "c.zarr", "--fps", "inf"], "--fps: inf is not a finite number"),
])
def test_a_float_flag_refuses_non_finite_values_naming_the_flag(args, fragment):
    result = run_cli(args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(fragment, result.output)


def test_a_learning_rate_group_refuses_non_finite_rates():
    for rate in ("nan", "inf"):
        with pytest.raises(ValueError, match=f"--lr-group '3.adapter={rate}': .*finite RATE"):
            load_config("tiny", {"lr_group": [f"3.adapter={rate}"]}).stage_group_rates()


def test_a_key_given_twice_in_one_file_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("epochs: 3\nlr: 0.1\nlr: 0.2\n")
    with pytest.raises(ValueError, match=f"{path}: line 3: 'lr' is given twice \\(first on line 2\\)"):
        load_config(["tiny", path])
    path.write_text("lr: 0.2\n")
    assert load_config(["tiny", path]).optim.lr == 0.2  # across stacked files, the later one wins


@pytest.mark.parametrize("content", [b"\x80\x02}q\x00(X\x05\x00\x00\x00model", b"PK\x03\x04\x00\x00archive/data.pkl"],
                         ids=["not utf-8", "control characters"])
def test_a_binary_config_file_is_named_as_not_yaml_text(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    result = run_cli(["train", "-c", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert_in_output(f"{path}: not a YAML text file", result.output)


def test_a_geometry_value_from_a_file_is_blamed_on_the_file_not_on_a_flag(tmp_path):
    """Only a value given as a flag is called one when it contradicts the cache's crop geometry."""
    from types import SimpleNamespace

    from caer.data.loaders import with_cache_geometry

    cache = SimpleNamespace(fingerprint={"margin": 20.0}, inputs={}, path="cache.zarr")
    path = tiny_with(tmp_path / "run.yaml", "margin: 7.0")
    with pytest.raises(ValueError) as err:
        with_cache_geometry(load_config(["tiny", path]), cache)
    assert f"margin 7.0 (from the config {path}) contradicts cache.zarr" in str(err.value)
    assert "--margin 7.0" not in str(err.value) and "flag" not in str(err.value)
    with pytest.raises(ValueError, match="^--margin 9.0 contradicts cache.zarr, .*drop the flag"):
        with_cache_geometry(load_config(path, {"margin": 9.0}), cache)
    saved = checkpoint_config({"config": to_flat(load_config(path))}, {"batch_size": 2})
    with pytest.raises(ValueError, match=r"^margin 7.0 \(from the checkpoint config\) contradicts cache.zarr"):
        with_cache_geometry(saved, cache)


def test_a_missing_list_says_the_callers_remedy():
    cfg = load_config("tiny")
    with pytest.raises(ValueError, match=r"--test-list is not set \(give it as a flag or in the config\)"):
        cfg.list_for("test")
    with pytest.raises(ValueError, match=r"--test-list is not set \(pass --split FILE\)"):
        cfg.list_for("test", "pass --split FILE")


@pytest.mark.parametrize("given, notes", [
    ({"optimizer": "adamw", "momentum": 0.5}, ["--momentum 0.5 has no effect under --optimizer adamw"]),
    ({"scheduler": "cosine", "gamma": 0.5, "milestones": [3]},
     ["--milestones [3] has no effect under --scheduler cosine", "--gamma 0.5 has no effect under --scheduler cosine"]),
    ({"scheduler": "step", "milestones": [3], "step_size": 4}, ["--step-size 4 has no effect under --milestones"]),
    ({"scheduler": "step", "step_size": 4, "gamma": 0.5, "optimizer": "sgd", "momentum": 0.5}, []),
    ({"optimizer": "adamw", "momentum": 0.9, "scheduler": "cosine", "gamma": 0.1}, []),  # the defaults: nothing set
])
def test_settings_that_the_chosen_optimiser_or_schedule_ignore_are_noted(given, notes):
    assert load_config("tiny", given).optim.ignored_settings() == notes


@pytest.mark.parametrize("name", ["tiny", "raer", "clip-caer-reference"])
def test_the_shipped_configs_set_nothing_they_ignore(name):
    assert load_config(name).optim.ignored_settings() == []


@pytest.mark.parametrize("flags, epochs", [
    ({}, [10, 30, 5]),  # raer.yaml's per-stage counts
    ({"epochs": 1}, [1, 1, 1]),  # flags win over files: the files' per-stage counts give way to --epochs
    ({"epochs": 1, "epochs_stage3": 5}, [1, 1, 5]),  # but a stage's own flag still wins over --epochs
])
def test_epochs_on_the_command_line_win_over_a_config_files_per_stage_counts(flags, epochs):
    cfg = load_config("raer", flags)
    assert [cfg.stage_epochs(stage) for stage in (1, 2, 3)] == epochs


def test_lists_of_option_names_name_declared_options():
    """The tuples that give options a role name declared options (a misspelt name would silently do nothing), and
    caer compare's help lists the settings it never shows."""
    from caer.cli import compare
    from caer.config import IMPORT_OVERRIDES, PREDICT_DETECTION, PREDICT_OVERRIDES, STAGE_EPOCHS, BoxesConfig
    from caer.pipeline.compare import IGNORED
    from caer.pipeline.train import RESUME_FREE

    run_options = set(option_names(RunConfig))
    for names in (EVAL_OVERRIDES, IMPORT_OVERRIDES, PREDICT_OVERRIDES, STAGE_EPOCHS, RESUME_FREE, IGNORED):
        assert set(names) <= run_options, set(names) - run_options
    assert set(PREDICT_DETECTION) <= set(option_names(BoxesConfig))
    listed = re.search(r"how it reports \(([^)]*)\)", " ".join(compare.__doc__.split())).group(1)
    assert sorted(listed.split(", ")) == sorted(IGNORED)


def test_without_a_config_file_the_run_has_the_raer_label_set_written_out_in_raer_yaml():
    """Classes and descriptions default together (a run needs both), and raer.yaml's copy is the same."""
    from caer.config import DEFAULT_CLASSES, DEFAULT_DESCRIPTIONS

    bare, raer = load_config(None), load_config("raer")
    assert bare.model.classes == raer.model.classes == DEFAULT_CLASSES
    assert bare.model.descriptions == raer.model.descriptions == DEFAULT_DESCRIPTIONS
    assert load_config("tiny").model.descriptions == DEFAULT_DESCRIPTIONS
    # other classes never borrow the RAER sentences
    with pytest.raises(ValueError, match="classes Bored, Happy come without descriptions: give one descriptive"):
        load_config("tiny", {"classes": ["Bored", "Happy"]})
    assert load_config("tiny", {"classes": ["Bored", "Happy"], "descriptions": ["a", "b"]}).model.classes == ["Bored", "Happy"]
    renamed = [c.upper() for c in DEFAULT_CLASSES]  # given on purpose, the RAER sentences may serve other names
    assert load_config("tiny", {"classes": renamed, "descriptions": DEFAULT_DESCRIPTIONS}).model.classes == renamed
