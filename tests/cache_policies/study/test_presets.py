"""TOML presets for argparse: keys are long options, the command line wins, every bad preset is one line
naming the file and the key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

import pytest

from cache_policies.study.presets import PresetParser, add_config_option


class Failed(Exception):
    pass


class Parser(PresetParser):
    def error(self, message: str) -> NoReturn:
        raise Failed(message)


def parser() -> Parser:
    p = Parser(prog="toy")
    add_config_option(p)
    p.add_argument("--name", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--mode", choices=("fast", "slow"), default="fast")
    p.add_argument("--path", type=Path)
    p.add_argument("--item", action="append")
    p.add_argument("--flag", action="store_true")
    p.add_argument("--cache-scope", default="global")
    return p


def preset(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return str(path)


FULL = """
name = "from-preset"
count = 3
rate = 2          # an integer where a float is expected is fine
mode = "slow"
path = "some/file"
item = ["a", "b"]
flag = true
"""


def test_preset_values_are_used_and_converted(tmp_path: Path) -> None:
    args = parser().parse_args(["--config", preset(tmp_path, FULL)])
    assert (args.name, args.count, args.rate, args.mode) == ("from-preset", 3, 2.0, "slow")
    assert args.path == Path("some/file") and args.item == ["a", "b"] and args.flag is True
    assert args.cache_scope == "global"  # not in the preset: the default


def test_the_command_line_wins(tmp_path: Path) -> None:
    path = preset(tmp_path, FULL)
    args = parser().parse_args(["--count", "7", "--config", path, "--item", "c", "--mode", "fast"])
    assert (args.count, args.item, args.mode, args.name) == (7, ["c"], "fast", "from-preset")


@pytest.mark.parametrize("form", ["--config={}", "--conf={}", "--con {}"])
def test_config_spellings(tmp_path: Path, form: str) -> None:
    argv = form.format(preset(tmp_path, 'name = "x"')).split(" ")
    assert parser().parse_args(argv).name == "x"


def test_a_required_option_may_come_from_the_preset_only(tmp_path: Path) -> None:
    p = parser()
    assert p.parse_args(["--config", preset(tmp_path, 'name = "x"')]).name == "x"
    with pytest.raises(Failed, match="--name"):  # the parser is left as it was: still required
        p.parse_args([])
    assert p.parse_args(["--name", "y"]).count == 1  # and the preset's values are not its defaults


def test_no_config_is_plain_argparse() -> None:
    assert parser().parse_args(["--name", "n"]).count == 1


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("count = 3\nname = 'x'\nnmae = 'y'", ["unknown key 'nmae'", "did you mean 'name'"]),
        ("zzz = 1", ["unknown key 'zzz'", "the keys are the long options", "cache-scope"]),
        ("cache_scope = 'layer'", ["unknown key 'cache_scope'", "did you mean 'cache-scope'"]),
        ("config = 'other.toml'", ["unknown key 'config'"]),
        ("count = '3'", ["key 'count' must be an integer", "'3' (a string)"]),
        ("count = 2.5", ["key 'count' must be an integer", "2.5 (a number)"]),
        ("count = true", ["key 'count' must be an integer", "true (a boolean)"]),
        ("rate = 'fast'", ["key 'rate' must be a number"]),
        ("name = 3", ["key 'name' must be a string", "3 (an integer)"]),
        ("mode = 'medium'", ["key 'mode' must be one of fast, slow", "'medium'"]),
        ("flag = 'yes'", ["key 'flag' must be true or false"]),
        ("item = [1]", ["key 'item' must be a string"]),
        ("[name]\nx = 1", ["key 'name' is a table"]),
        ("name = \ncount = 1", ["not valid TOML", "line 1"]),
    ],
)
def test_bad_presets_are_one_line_naming_the_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = preset(tmp_path, text)
    with pytest.raises(Failed) as failed:
        parser().parse_args(["--config", path, "--name", "n"])
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"--config {path}: ")
    for needle in needles:
        assert needle in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(Failed, match="no such file"):
        parser().parse_args(["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(Failed, match="cannot read it"):
        parser().parse_args(["--config", str(tmp_path)])
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"')
    with pytest.raises(Failed, match="not valid TOML"):
        parser().parse_args(["--config", str(tmp_path / "latin1.toml")])


def test_a_parser_without_config_ignores_the_word(tmp_path: Path) -> None:
    p = Parser(prog="bare")
    p.add_argument("--x", default=argparse.SUPPRESS)
    with pytest.raises(Failed, match="unrecognized arguments"):
        p.parse_args(["--config", preset(tmp_path, "x = 1")])
