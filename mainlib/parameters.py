"""Flat parameter names, types and rules, all derived from the settings dataclasses (no hand-kept tables).

A pipeline's configuration is a tree of dataclasses (`config.MainConfig`, `config.MuscConfig`). What a field
allows is written once, next to it, in its metadata; everything else is derived from that:

leaf fields
    help      one line: what the option does and why (required; `describe` lists it)
    range     an interval for a number, "(0, 1]", "[1, inf)"; the bracket says whether the end is allowed
    choices   the allowed values of a plain `str` field (a `Literal` annotation needs none)
    excludes  a sibling field that must be None while this one is set (top_fraction / threshold)
    hint      added to an error about this field
    name      the flat name's stem instead of the attribute name (`mode` -> `weight_mode`)
    source    what an I/O check reads before a run (`config.validate`): model, adapter, pairs, pool, ...
fields holding nested settings
    prefix    prepended to the nested flat names ("round_" for round_sft); default `<field>_`
    shared    {"sub.path": "sibling"}: nested fields that follow one sibling field (the run's one `seed`),
              so they are not parameters of their own

Flat names are what a notebook's parameters cell and `papermill -p` set (`learning_rate`, `round_epochs`).
`flat_parameters` fails when two leaves would get one name, so a new field cannot shadow an old one. Rules
that involve several fields of one settings class live in its `rules()` method, which returns
(field, value, allowed) for each broken rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Path_ = tuple[str, ...]  # attribute path from the root config, ("main", "top_fraction")


class ConfigError(ValueError):
    """Everything wrong with a configuration, one line per problem, each naming the parameter."""

    def __init__(self, problems: Sequence[Problem], where: str = "") -> None:
        self.problems, self.where = list(problems), where
        names = ", ".join(dict.fromkeys(p.name for p in self.problems))
        head = f"{where}: " if where else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{head}{len(self.problems)} invalid parameter(s): {names}\n{lines}")

    def __reduce__(self):  # pickles with its problems (a worker process can raise it)
        return type(self), (self.problems, self.where)


@dataclass(frozen=True)
class Problem:
    """One broken rule: the flat name, the attribute path, the value, and what is allowed instead."""

    name: str
    path: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        where = f"parameter {self.name}" + (f" ({self.path})" if self.path and self.path != self.name else "")
        return f"{where}: got {self.value!r}; allowed: {self.allowed}"


@dataclass(frozen=True)
class Parameter:
    """One leaf option: its flat name, where it lives, its type and its dataclass field."""

    name: str
    path: Path_
    type: Any
    field: dataclasses.Field

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", "")

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def is_settings(annotation: Any) -> bool:
    """A nested settings dataclass (a subtree), as opposed to a leaf option."""
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field (the modules use `from __future__ import annotations`)."""
    return get_type_hints(cls)


def _shared(field: dataclasses.Field, here: Path_) -> dict[Path_, Path_]:
    """{path of a nested field -> path of the sibling it follows} declared by `field`'s `shared` metadata."""
    return {
        (*here, *sub.split(".")): (*here[:-1], sibling) for sub, sibling in field.metadata.get("shared", {}).items()
    }


def _walk(cls: type, prefix: str = "", path: Path_ = ()) -> Iterator[Parameter | tuple[Path_, Path_]]:
    """Every leaf Parameter under `cls`, and (follower, leader) pairs for shared fields."""
    for field in dataclasses.fields(cls):
        here, annotation = (*path, field.name), field_types(cls)[field.name]
        if is_settings(annotation):
            shared = _shared(field, here)
            yield from shared.items()
            for item in _walk(annotation, prefix + field.metadata.get("prefix", f"{field.name}_"), here):
                if isinstance(item, tuple) or item.path not in shared:
                    yield item
        else:
            yield Parameter(prefix + field.metadata.get("name", field.name), here, annotation, field)


@functools.cache
def parameters_of(cls: type) -> dict[str, Parameter]:
    """Flat name -> Parameter for every leaf of `cls`; two leaves with one flat name are an error."""
    table: dict[str, Parameter] = {}
    for item in _walk(cls):
        if isinstance(item, tuple):
            continue
        if item.name in table:
            raise TypeError(
                f"{cls.__name__}: the flat name {item.name!r} would mean both {table[item.name].dotted} and "
                f"{item.dotted}; give one of the nested fields another `prefix` (or the leaf a `name`)"
            )
        table[item.name] = item
    return table


@functools.cache
def shared_fields(cls: type) -> dict[Path_, Path_]:
    """Path of each nested field that follows another field -> the path of that field."""
    return dict(item for item in _walk(cls) if isinstance(item, tuple))


def flat_parameters(cls: type) -> dict[str, Path_]:
    """Flat name -> attribute path, derived from the dataclass fields (see the module docstring)."""
    return {name: p.path for name, p in parameters_of(cls).items()}


def name_of(cls: type, path: Path_) -> str:
    """The flat name of `path` in `cls`, or the dotted path when it has none (a subtree, a shared field)."""
    by_path = {p.path: name for name, p in parameters_of(cls).items()}
    return by_path.get(tuple(path), ".".join(path))


def close_matches(word: str, names: Sequence[str]) -> str:
    found = difflib.get_close_matches(word, list(names), n=3, cutoff=0.6)
    return f"did you mean {', '.join(found)}?" if found else ""


def get_path(obj: Any, path: Path_) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, path: Path_, value: Any) -> None:
    setattr(get_path(obj, path[:-1]), path[-1], value)


def share(config: Any) -> None:
    """Give every shared nested field the value of the field it follows (one place: the declaration)."""
    for follower, leader in shared_fields(type(config)).items():
        set_path(config, follower, get_path(config, leader))


# ---- types and ranges -----------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    """`int | None`, `'kl' | 'pmi'`, `list[str]`: the annotation as a reader would write it."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def fits(value: Any, annotation: Any) -> bool:
    """Whether `value` has the annotated type (an int is a float; a bool is not an int)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin in (list, tuple, Sequence):
        item = args[0] if args else Any
        return isinstance(value, list | tuple) and all(fits(v, item) for v in value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if is_settings(annotation):
        return type(value) is annotation  # a subclass would carry fields the pipeline ignores
    return isinstance(value, origin or annotation)


_INTERVAL = re.compile(r"^([\[(])\s*(-?inf|[-+.\deE]+)\s*,\s*(-?inf|[-+.\deE]+)\s*([\])])$")


def in_range(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written "(0, 1]" or "[1, inf)"."""
    match = _INTERVAL.match(interval)
    if not match:
        raise ValueError(f"bad range {interval!r}; write it like '(0, 1]' or '[1, inf)'")
    low_bracket, low, high, high_bracket = match.groups()
    low_value, high_value = float(low), float(high)
    above = value > low_value or (low_bracket == "[" and value == low_value)
    below = value < high_value or (high_bracket == "]" and value == high_value)
    return above and below and not math.isnan(value)


def type_allowed(value: Any, annotation: Any) -> str:
    """The annotated type in words, with a hint when `value` is a number YAML read as text."""
    text = type_name(annotation)
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        text += f" ({value!r} is text: write the number without quotes; `papermill -y` needs a dot, like 5.0e-6)"
    return text


def leaf_problem(obj: Any, field: dataclasses.Field, annotation: Any) -> str | None:
    """What is allowed for `field` of `obj` when its value breaks the field's type or metadata; else None."""
    value, meta = getattr(obj, field.name), field.metadata
    hint = f" ({meta['hint']})" if "hint" in meta else ""
    if not fits(value, annotation):
        return type_allowed(value, annotation) + hint
    if "range" in meta and isinstance(value, int | float) and not in_range(value, meta["range"]):
        return f"{meta['range']}{hint}"
    if "choices" in meta and value not in meta["choices"]:
        return " | ".join(map(repr, meta["choices"])) + hint
    other = meta.get("excludes")
    if other and value is not None and getattr(obj, other) is not None:
        return f"None while {other} is set ({getattr(obj, other)!r}): they exclude each other, set one of them to None"
    return None


def find_problems(obj: Any, path: Path_ = ()) -> list[tuple[Path_, Any, str]]:
    """(path, value, allowed) for every broken rule in `obj` and its nested settings, all of them."""
    found: list[tuple[Path_, Any, str]] = []
    for field in dataclasses.fields(obj):
        annotation, here = field_types(type(obj))[field.name], (*path, field.name)
        value = getattr(obj, field.name)
        if is_settings(annotation) and fits(value, annotation):
            found += find_problems(value, here)
        elif (allowed := leaf_problem(obj, field, annotation)) is not None:
            found.append((here, value, allowed))
    if not found and hasattr(obj, "rules"):  # rules between fields assume each field is fine on its own
        found += [((*path, *name.split(".")), value, allowed) for name, value, allowed in obj.rules()]
    elif not found and hasattr(obj, "validate") and path:
        try:
            obj.validate()
        except ValueError as e:
            found.append((path, type(obj).__name__, str(e)))
    return found


def problems(config: Any) -> list[Problem]:
    """Every broken type, range, choice, exclusion and rule of `config`, with flat names."""
    cls = type(config)
    found = find_problems(config)
    for follower, leader in shared_fields(cls).items():
        if get_path(config, follower) != get_path(config, leader):
            allowed = f"the value of {name_of(cls, leader)} ({get_path(config, leader)!r}); set that one only"
            found.append((follower, get_path(config, follower), allowed))
    return [Problem(name_of(cls, path), ".".join(path), value, allowed) for path, value, allowed in found]


def check(config: Any) -> None:
    """Raise one ConfigError listing every problem of `config` (a whole config or one settings object)."""
    if found := problems(config):
        raise ConfigError(found)


# ---- listing ---------------------------------------------------------------------------------------


def describe(cls: type) -> list[dict[str, str]]:
    """One row per option of `cls`: flat name, path, type, default and help (for docs and the CLI)."""
    defaults = cls()
    rows = []
    for name, p in parameters_of(cls).items():
        text = p.help
        if "range" in p.field.metadata:
            text += f"; range {p.field.metadata['range']}"
        if "choices" in p.field.metadata:
            text += f"; one of {', '.join(p.field.metadata['choices'])}"
        rows.append(
            {
                "name": name,
                "path": p.dotted,
                "type": type_name(p.type),
                "default": repr(get_path(defaults, p.path)),
                "help": text,
            }
        )
    return rows


def unknown_names(names: Mapping[str, Any] | Sequence[str], known: Sequence[str]) -> list[Problem]:
    """A Problem for each name that is not a known flat parameter, with the closest known names."""
    return [
        Problem(name, "", names[name] if isinstance(names, Mapping) else None, _unknown_help(name, known))
        for name in names
        if name not in known
    ]


def _unknown_help(name: str, known: Sequence[str]) -> str:
    suggestion = close_matches(name, known)
    return f"no such parameter{'; ' + suggestion if suggestion else ''} (python -m mainlib.config lists them)"
