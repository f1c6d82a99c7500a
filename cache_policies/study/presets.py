"""TOML presets for command-line programs: ``--config FILE`` whose keys are the program's long options.

    vram-budget = "10.5GiB"     # as --vram-budget 10.5GiB
    max-context = 4096          # as --max-context 4096 (an integer option takes a TOML integer)
    trace = ["a.jsonl", "b.npz"]  # a repeatable option takes a list

A parser built on :class:`PresetParser` with :func:`add_config_option` reads the file before it parses the
command line; options given on the command line win (a repeatable one given there replaces the preset's
list). Every key is checked against the parser's own options, types and choices before anything runs, and a
bad preset (missing file, invalid TOML, unknown key, wrong type) is one line naming the file and the key,
through the parser's ``error`` (exit code 2 in every command of this project).

Standard library only, at the bottom layer, so ``offload-run``, ``offload-serve`` and ``offload-bench sweep``
share it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as a package (a dependency on 3.10 only)
    import tomli as tomllib

CONFIG = "--config"


class PresetError(ValueError):
    """A preset that cannot be used; the message is one line."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CONFIG,
        metavar="FILE",
        help='TOML preset whose keys are this command\'s long options (vram-budget = "12GB"); '
        "options on the command line win",
    )


class PresetParser(argparse.ArgumentParser):
    """An ArgumentParser that applies ``--config FILE`` when it has that option (see the module docstring).
    Subclasses keep their own ``error``; preset errors go through it."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = list(sys.argv[1:] if args is None else args)
        path = self._config_path(given)
        if path is None:
            return super().parse_known_args(given, namespace)
        try:
            preset = read_preset(path, self)
        except PresetError as exc:
            self.error(str(exc))
        saved = [(action, action.default, action.required) for action in preset]
        try:
            # A preset value becomes the option's default, so a value on the command line replaces it. A
            # repeatable option would append to a list default: it gets None, and the preset's list after.
            for action, value in preset.items():
                action.required = False
                action.default = None if isinstance(action, argparse._AppendAction) else value
            parsed, extra = super().parse_known_args(given, namespace)
        finally:
            for action, default, required in saved:
                action.default, action.required = default, required
        for action, value in preset.items():
            if getattr(parsed, action.dest, None) is None:
                setattr(parsed, action.dest, value)
        return parsed, extra

    def _config_path(self, args: list[str]) -> str | None:
        """The value of ``--config`` (or an unambiguous abbreviation, as argparse allows) in ``args``."""
        if CONFIG not in self._option_string_actions:
            return None
        longs = [o for o in self._option_string_actions if o.startswith("--")]
        for i, token in enumerate(args):
            if token == "--":
                break
            name, eq, value = token.partition("=")
            matches = [o for o in longs if o.startswith(name)] if self.allow_abbrev else []
            if name == CONFIG or (len(name) > 2 and matches == [CONFIG]):
                if eq:
                    return value
                if i + 1 < len(args):
                    return args[i + 1]
                return None  # argparse reports the missing value
        return None


def read_preset(path: str | Path, parser: argparse.ArgumentParser) -> dict[argparse.Action, Any]:
    """The preset at ``path`` as option values of ``parser``, converted and checked like the command line
    would: ``{action: value}``. PresetError, one line, on any problem."""
    where = f"{CONFIG} {path}"
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise PresetError(f"{where}: no such file") from None
    except OSError as exc:
        raise PresetError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PresetError(f"{where}: not valid TOML: {exc}") from None
    by_option = {o[2:]: a for a in parser._actions for o in a.option_strings if o.startswith("--")}
    values: dict[argparse.Action, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            raise PresetError(f"{where}: key {key!r} is a table; a preset is flat: option = value")
        action = by_option.get(key)
        if action is None or key in ("config", "help"):
            raise PresetError(f"{where}: unknown key {key!r}{_suggest(key, by_option)}")
        values[action] = _convert(action, key, value, where)
    return values


def _suggest(key: str, by_option: dict[str, argparse.Action]) -> str:
    names = [k for k in by_option if k not in ("config", "help")]
    close = difflib.get_close_matches(key.replace("_", "-"), names, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; the keys are the long options: {', '.join(sorted(names))}"


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise PresetError(f"{where}: key {key!r} must be true or false, got {_show(value)}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, key, item, where) for item in items]
    if type(action) is argparse._StoreAction and action.nargs in (None, "?"):
        return _scalar(action, key, value, where)
    raise PresetError(f"{where}: key {key!r} cannot be set in a preset")


def _scalar(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    kind = action.type
    if kind is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif kind is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif callable(kind):
        # a parsing type: the text it parses, or a number written as one (prefill-chunk = 512)
        ok, expected = isinstance(value, (str, int)) and not isinstance(value, bool), "a string or an integer"
        value = str(value) if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise PresetError(f"{where}: key {key!r} must be {expected}, got {_show(value)}")
    if callable(kind) and kind not in (int, float):
        try:
            value = kind(value)
        except (TypeError, ValueError) as exc:
            raise PresetError(f"{where}: key {key!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise PresetError(f"{where}: key {key!r} must be one of {choices}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value) if not isinstance(value, bool) else str(value).lower()
    return f"{text} ({kind})"
