"""Strict YAML read into typed dataclasses: the machinery behind recipes, which know nothing of what they say.

It owns the YAML 1.2 core-schema loader (no anchors, aliases, tags or duplicate keys; limited depth and size), the
exact fractions (`8/255`) that number fields accept, `key.sub=value` overrides, `base:` inheritance (mappings merge
deeply, lists and scalars replace), checking a plain tree against a dataclass's type hints (`build`: errors name the
key and the file), and reading and writing the files. The dataclasses state their own rules with `ensure`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml

from sglr_zoo.errors import UserError
from sglr_zoo.files import read_regular, write_atomic

MAX_RECIPE_BYTES = 1 << 20  # recipes are a few kB; a bigger file is a mistake, refused before it is parsed
_MAX_DEPTH = 32  # nesting levels (recipes use 3); PyYAML's composer recurses once per level
_HUGE_EXPONENT = re.compile(r"[eE][-+]?0*[0-9]{4,}")  # Fraction("1e99999") would build a 10**99999 integer


def parse_fraction(value: Any) -> Fraction:
    """Reads `8/255`, `0.5`, `2` (str, int or float) into an exact fraction that is finite as a float too."""
    huge_exponent = isinstance(value, str) and _HUGE_EXPONENT.search(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Fraction)) or huge_exponent:
        raise ValueError(f"expected a finite number or a fraction like 8/255, got {value!r}")
    try:
        # str(float) is the shortest decimal that reads back as the float: 0.1 becomes 1/10.
        result = Fraction(value.replace(" ", "") if isinstance(value, str) else str(value) if isinstance(value, float)
                          else value)
        float(result)  # 1e400 has no float
    except (ValueError, ZeroDivisionError, OverflowError):  # nan, inf, 1/0, text
        raise ValueError(f"expected a finite number or a fraction like 8/255, got {value!r}") from None
    return result


def format_fraction(value: Fraction) -> str | int | float:
    """The YAML form of a fraction: an int, a short decimal, `k/255` (pixel units) or `p/q`."""
    if value.denominator == 1:
        return value.numerator
    if Fraction(str(float(value))) == value and len(str(float(value))) <= 8:
        return float(value)
    if 255 % value.denominator == 0 and value.denominator % 17 == 0:  # pixel units: 3/255, not 1/85
        return f"{value * 255}/255"
    return f"{value.numerator}/{value.denominator}"


class InvalidField(ValueError):
    """A dataclass field's value breaks its rule; `build` names the whole key and the file."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def ensure(condition: bool, key: str, message: str) -> None:
    """A rule of a dataclass's `__post_init__`: raises InvalidField(key, message) unless `condition` holds."""
    if not condition:
        raise InvalidField(key, message)


def to_plain(value: Any) -> Any:
    """A tree of dicts and lists made YAML-safe: fractions written as `format_fraction` writes them."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, Fraction):
        return format_fraction(value)
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks `value` against a type hint, converting fractions; raises UserError naming `where`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as error:
                errors.append(error)
        if len(errors) > 1:  # name every accepted form, not only the first one tried
            accepted = " or ".join(_describe(option) for option in options if option is not type(None))
            raise UserError(f"{where}: expected {accepted}, got {value!r}")
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        _check_finite(value, where)
        return dict(value)
    if hint in (Fraction, float):
        try:
            number = parse_fraction(value)
        except ValueError as error:
            raise UserError(f"{where}: {error}") from None
        return number if hint is Fraction else float(number)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"{where}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return "true or false" if hint is bool else getattr(hint, "__name__", str(hint))


def _check_finite(value: Any, where: str) -> None:
    """Refuses inf and nan anywhere in a free-form value (such as model.kwargs), and keys that are not names."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UserError(f"{where}: key {key!r} must be a name (a string)")
            _check_finite(item, f"{where}.{key}")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the annotations' text (`from __future__ import annotations`): once


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = _type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise UserError(f"unknown key {prefix}{unknown[0]!s}; allowed keys{' in ' + where if where else ''}: "
                        f"{', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        values[name] = _build(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(value, hint, key)
    try:
        return cls(**values)
    except InvalidField as error:
        key = error.key if "." in error.key or not where else f"{where}.{error.key}"
        raise UserError(f"{key}: {error}") from None


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe may not use (anchors, tags, duplicate keys, deep nesting)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, no anchors, aliases or tags, and duplicate keys refused.

    Only `true`/`false` are booleans (`no` stays a string), `010` is ten, and aliases are refused while parsing, so
    a "billion laughs" file fails before anything is expanded.
    """

    yaml_implicit_resolvers: dict = {}  # filled below with the 1.2 core schema only (no 1.1 yes/no, octal, dates)

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        if event.anchor is not None:  # both &anchor and *alias
            raise _Refused(problem="anchors and aliases (&name, *name) are not allowed in recipes; write the value out",
                           problem_mark=event.start_mark)
        if getattr(event, "tag", None) is not None:
            raise _Refused(problem=f"tags ({event.tag}) are not allowed in recipes", problem_mark=event.start_mark)
        if self.depth >= _MAX_DEPTH:
            raise _Refused(problem=f"nested more than {_MAX_DEPTH} levels deep", problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[str, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag != "tag:yaml.org,2002:str":
                raise _Refused(problem=f"key {key_node.value!r} must be a name; quote it if it is one",
                               problem_mark=key_node.start_mark)
            if key_node.value in lines:
                raise _Refused(problem=f"duplicate key {key_node.value!r} (first on line {lines[key_node.value]})",
                               problem_mark=key_node.start_mark)
            lines[key_node.value] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        base = {"0o": 8, "0x": 16}.get(text[:2], 10)
        try:
            return int(text[2:] if base != 10 else text, base)  # int("010") is 10: no 1.1 octal
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise _Refused(problem=f"the number {text[:20]}... is too long", problem_mark=node.start_mark) from None


# https://yaml.org/spec/1.2.2/#1032-tag-resolution
for _tag, _pattern, _first in [
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+.0123456789")),
]:
    _StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(rf"(?:{_pattern})\Z"), _first)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 readers or our 1.2 loader would read as something else (`no`, `1e3`)."""


for _first, _resolvers in _StrictLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag, _regexp, [_first])


def _parse_yaml(text: str) -> Any:
    """Parses one YAML document with `_StrictLoader`; raises yaml.YAMLError."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: what is wrong and where."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(", ".join(filter(None, (error.context, error.problem))).split())
        return f"{where}: {problem}" if isinstance(error, _Refused) else f"malformed YAML ({where}): {problem}"
    if isinstance(error, yaml.reader.ReaderError):
        return f"malformed YAML: character {error.character:#x} at position {error.position} is not allowed"
    return f"malformed YAML: {' '.join(str(error).split())}"


def _set_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise UserError(f"override {override!r}: write it as key.sub=value, e.g. schedule.epochs=10")
    key, raw = override.split("=", 1)
    try:
        value = _parse_yaml(raw) if raw else None
    except _Refused as error:
        raise UserError(f"override {override!r}: {error.problem}") from None
    except yaml.YAMLError:
        value = raw  # not YAML (`run.name=a: b: c`): the text as written
    node = tree
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {override!r}: {part} is not a section")
    node[leaf] = value


def build(cls: type, data: dict[str, Any], overrides: list[str] = (), source: str = "recipe") -> Any:
    """An instance of the dataclass `cls` from a plain tree plus `key.sub=value` overrides (which win); a wrong key,
    type or value is a UserError naming `source` and the key."""
    tree = _deep_copy(data)
    try:
        for override in overrides:
            _set_override(tree, override)
        return _build(cls, tree, "")
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def _read_yaml(path: Path, base_of: Path | None = None) -> dict[str, Any]:
    """One recipe file (the base named in `base_of`), strictly parsed: a non-empty UTF-8 mapping of limited size."""
    name = f"{base_of}: base file {path}" if base_of else f"recipe file {path}"
    try:
        raw = read_regular(path, MAX_RECIPE_BYTES, "recipe")  # a FIFO or a device is refused, never waited on
    except (FileNotFoundError, NotADirectoryError):
        fix = f"`base:` is relative to {base_of.parent}" if base_of else "see recipes/ for examples"
        raise UserError(f"{name} not found; {fix}") from None
    except UserError as error:
        raise UserError(f"{base_of}: base file {error}" if base_of else str(error)) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        raise UserError(f"{name} cannot be read: {getattr(error, 'strerror', None) or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {_yaml_problem(error)}") from None
    if data is None or data == {}:
        raise UserError(f"{path}: the file states no recipe; write sections such as `model:` and `schedule:` "
                        "(see recipes/ for examples)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data:, model:, ...), "
                        f"got a {type(data).__name__}")
    return data


def read_tree(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The file's tree on top of its `base:` chain (mappings merge deeply, lists and scalars replace) and the bases."""
    tree = _read_yaml(path, base_of=chain[-1] if chain else None)
    if "base" not in tree:
        return tree, []
    base = tree.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{path}: base: expected a recipe file relative to {path.parent}, got {base!r}")
    base_path = path.parent / base
    chain = (*chain, path)
    try:
        cycle = any(base_path.resolve() == p.resolve() for p in chain)
    except (OSError, ValueError, RuntimeError):  # a bad name or a symlink loop: reading it below says so
        cycle = False
    if cycle:
        raise UserError(f"{path}: base {base} leads back to {base_path} "
                        f"({' -> '.join(str(p) for p in (*chain, base_path))}); remove the cycle")
    base_tree, bases = read_tree(base_path, chain)
    return _merge(base_tree, tree), [base_path, *bases]


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings else value
    return merged


def write_yaml(tree: dict[str, Any], path: Path) -> None:
    """Writes a plain tree (`to_plain`) as YAML that our loader, and YAML 1.1 readers, read back the same."""
    write_atomic(path, yaml.dump(tree, Dumper=_Dumper, sort_keys=False).encode())


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
