"""Every option is declared once (caer/config.py): the CLI flags and the config-file keys come from that one
declaration, and both are checked against the same choices and ranges."""

from __future__ import annotations

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


def test_yaml_exponent_without_a_dot_is_a_float(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text((CONFIG_DIR / "tiny.yaml").read_text() + "\nlr_image_encoder: 1e-5\n")
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
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIG_DIR / "tiny.yaml").read_text() + f"\n{name}: {value}\n")
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
