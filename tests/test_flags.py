"""Every flag a command accepts either reaches its setting (and some stage reads that setting) or is refused
with a usage error: none is accepted and ignored."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import onnxadmm
from onnxadmm.cli import _configs, build_parser
from onnxadmm.config import CheckConfig, CompressConfig, ValidateConfig
from onnxadmm.errors import ConfigError

PACKAGE = Path(onnxadmm.__file__).parent
SPECIAL = {"nm": "1:4", "exclude": "conv1", "platform": "linux-aarch64", "latency_batch_sizes": "4",
           "labels": "labels", "calib_samples": "3", "eval_samples": "3", "token_mask": "none"}


def _value(field: dataclasses.Field, cls) -> list[str]:
    """Command-line words that set ``field`` to something other than its default."""
    if field.name in SPECIAL:
        return [SPECIAL[field.name]]
    choices = field.metadata.get("choices")
    if choices:
        return [next(c for c in choices if c != field.default)]
    hint = typing.get_type_hints(cls)[field.name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is float:
        return ["0.5" if field.default != 0.5 else "0.25"]
    if base is int:
        return [str((field.default or 0) + 2)]
    raise AssertionError(f"no test value for {field.name} ({hint})")


def _flags(cls):
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        if hint is bool:
            yield field, [f"--{'no-' if field.default else ''}{field.name.replace('_', '-')}"]
        else:
            yield field, [f"--{field.name.replace('_', '-')}", *_value(field, cls)]


COMPRESS_FLAGS = [(cls, f, words) for cls in (CompressConfig, ValidateConfig) for f, words in _flags(cls)]


@pytest.mark.parametrize("cls,field,words", COMPRESS_FLAGS, ids=[f.name for _, f, _ in COMPRESS_FLAGS])
def test_every_compress_flag_sets_its_value_or_is_refused(cls, field, words):
    args = build_parser().parse_args(["compress", "m.onnx", "out.onnx", "--calib", "random:4", *words])
    try:
        compress_config, validate_config = _configs(args, with_compress=True)
    except ConfigError:
        return  # refused (e.g. a method option without its method): exit 2, never ignored
    config = compress_config if cls is CompressConfig else validate_config
    assert getattr(config, field.name) != field.default, f"{words} did not reach {cls.__name__}.{field.name}"


VALIDATE_FLAGS = list(_flags(ValidateConfig))


@pytest.mark.parametrize("field,words", VALIDATE_FLAGS, ids=[f.name for f, _ in VALIDATE_FLAGS])
def test_every_validate_flag_sets_its_value_or_is_refused(field, words):
    args = build_parser().parse_args(["validate", "a.onnx", "b.onnx", "--data", "d.npz", *words])
    try:
        _, config = _configs(args, with_compress=False)
    except ConfigError:
        return
    assert getattr(config, field.name) != field.default


def _read_by_a_stage(name: str) -> bool:
    """Some module other than the config and the CLI reads ``<config>.name`` (or the property built on it)."""
    pattern = re.compile(rf"\.{name}\b" if name != "nm" else r"\.nm_pattern\b")
    return any(pattern.search(p.read_text()) for p in PACKAGE.rglob("*.py") if p.name not in ("config.py", "cli.py"))


@pytest.mark.parametrize("name", sorted({f.name for cls in (CompressConfig, ValidateConfig, CheckConfig)
                                         for f in dataclasses.fields(cls)}))
def test_every_setting_is_read_by_a_stage(name):
    assert _read_by_a_stage(name), f"setting {name!r} is parsed but no stage reads it"


def test_check_takes_only_the_settings_it_uses():
    check = build_parser()._subparsers._group_actions[0].choices["check"]
    flags = {a.dest for a in check._actions if a.option_strings} - {"help", "debug", "report"}
    assert flags == {f.name for f in dataclasses.fields(CheckConfig)}


def test_toml_tables_group_settings_by_their_prefix(tmp_path):
    from onnxadmm.config import load_toml

    path = tmp_path / "settings.toml"
    path.write_text('method = "sparse"\nsparsity = 0.7\n[refine]\nepochs = 3\nblock_layers = 2\n[admm]\n'
                    'iterations = 7\n[validate]\nmin_agreement = 0.9\n')
    config, validate = load_toml(path)
    assert (config.refine_epochs, config.refine_block_layers, config.admm_iterations) == (3, 2, 7)
    assert validate.min_agreement == 0.9
    path.write_text("refine_epochs = 2\n[refine]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="set twice"):
        load_toml(path)
    path.write_text("[refine]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'refine_epochs'"):
        load_toml(path)


@pytest.mark.parametrize("command", ["compress", "validate", "check"])
def test_help_lists_every_flag(command, capsys):
    """``--help`` prints (a help text with a literal % once made argparse's formatting fail)."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        for flag in action.option_strings:
            assert flag in printed
    if command == "compress":
        assert "10 % faster" in " ".join(printed.split())
