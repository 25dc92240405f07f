"""Flags generated from the config dataclasses: one place for a setting's name, default and help."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest

from locoswarm.errors import ConfigError
from locoswarm.node.cli import SIM_FLAGS, build_parser
from locoswarm.node.config import NodeConfig
from locoswarm.node.run import RUN_FLAGS
from locoswarm.settings import Flag, add_flags, build, coerce, field_docs, flag_values, nest
from locoswarm.sim.config import SimConfig


def _default(root: type, key: str) -> object:
    cls: typing.Any = root
    value: object = None
    for part in key.split("."):
        fld = {f.name: f for f in dataclasses.fields(cls)}[part]
        missing = fld.default is dataclasses.MISSING
        value = fld.default_factory() if missing else fld.default  # type: ignore[operator]
        cls = type(value)
    return value


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[command].format_help().split())


@pytest.mark.parametrize(
    ("command", "root", "flags"), [("sim", SimConfig, SIM_FLAGS), ("run", NodeConfig, RUN_FLAGS)]
)
def test_every_flag_says_its_fields_default_and_doc(
    command: str, root: type, flags: tuple[Flag, ...]
) -> None:
    text = _help(command)
    for flag in flags:
        assert f" {flag.flag}" in text
        if flag.help or flag.default or flag.scale != 1.0 or flag.const is not Flag("x").const:
            continue
        value = _default(root, flag.key)
        if value in (None, (), ""):
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        assert f"(default {shown})" in text, flag.flag


def test_sim_rounds_help_is_simconfigs_default() -> None:
    # The defect this replaced: `sim --rounds` said 20 while SimConfig.rounds is 40.
    assert f"(default {SimConfig().rounds})" in _help("sim").split("--rounds ROUNDS ", 1)[1][:120]


@pytest.mark.parametrize(("root", "flags"), [(SimConfig, SIM_FLAGS), (NodeConfig, RUN_FLAGS)])
def test_every_flag_has_help_from_a_docstring_or_its_own(
    root: type, flags: tuple[Flag, ...]
) -> None:
    for flag in flags:
        *path, name = flag.key.split(".")
        cls: typing.Any = root
        for part in path:
            hint = typing.get_type_hints(cls)[part]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            cls = args[0] if args else hint
        assert flag.help or field_docs(cls).get(name), f"{flag.flag}: {cls.__name__}.{name}"


def test_mode_defaults_in_help_come_from_the_round_defaults() -> None:
    text = _help("sim")
    assert "(default noloco 0.5, diloco 0.7, ef 0.7)" in text  # --outer-momentum
    assert "(default diloco 16, ef 4)" in text  # --bits


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
    rate: float = 2.0
    """Bytes per second."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Root:
    count: int = 3
    """How many. More text here."""
    names: tuple[str, ...] = ()
    """Names to use."""
    mode: typing.Literal["a", "b"] = "a"
    """The mode."""
    on: bool = True
    """Whether it is on."""
    port: int | None = 5
    """A port."""
    inner: _Inner = dataclasses.field(default_factory=_Inner)


FLAGS = (
    Flag("count"),
    Flag("names", "--name", repeat=True),
    Flag("mode"),
    Flag("on", "--off", const=False, help="turn it off"),
    Flag("port", none_word="off"),
    Flag("inner.rate", "--rate-kbit", scale=1000 / 8, unit="kbit/s"),
)


def _parse(*args: str) -> _Root:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_flags(p, _Root, FLAGS)
    ns = p.parse_args(args)
    return build(_Root, nest(flag_values(ns, FLAGS)))  # type: ignore[no-any-return]


def test_flags_set_only_what_is_given() -> None:
    assert _parse() == _Root()
    got = _parse(
        "--count", "7", "--name", "x", "--name", "y", "z", "--mode", "b", "--off", "--port", "off",
        "--rate-kbit", "8",
    )  # fmt: skip
    assert got == _Root(count=7, names=("x", "y", "z"), mode="b", on=False, port=None,
                        inner=_Inner(rate=1000.0))  # fmt: skip


def test_help_is_the_first_sentence_of_the_doc_with_the_default() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, _Root, FLAGS)
    text = " ".join(p.format_help().split())
    assert "How many (default 3)" in text
    assert "More text" not in text
    assert "{a,b}" in text
    assert "turn it off" in text
    assert "kbit/s" in text


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--count", "x"), "--count"),
        (("--mode", "c"), "must be one of a, b"),
        (("--port", "p"), "--port"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=match):
        _parse(*args)


def test_coerce_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"sync\.bits: cannot use 'x' as int"):
        coerce("x", int, "sync.bits")
    assert coerce("a,b", tuple[str, ...], "k") == ("a", "b")
    assert coerce("none", Path | None, "k") is None
    inner = _Inner(rate=1.0)
    assert coerce(inner, _Inner, "k") is inner
