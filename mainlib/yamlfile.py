"""The one YAML reader of the project (sweep files, recipes): numbers are numbers, errors name the file.

PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent: `1e-3`, `1E+5` and `1.0e3` come
back as the *strings* '1e-3', '1E+5', '1.0e3', and a learning rate or a sweep value silently becomes text.
`Loader` reads them as floats (as YAML 1.2 and every other reader of these files do), refuses a key given
twice in one mapping (YAML 1.1 keeps the last one without a word), and `load_yaml` names `file:line` in
every error: syntax, duplicate keys, or bytes that are not UTF-8 (a UTF-8 BOM is fine).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# YAML 1.2's float (exponent sign optional, no dot needed) plus YAML 1.1's `.inf` / `.nan` and `_` separators
FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.(?:inf|Inf|INF))$
    |^\.(?:nan|NaN|NAN)$""",
    re.VERBOSE,
)


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with YAML 1.2 floats (`1e-3` is 0.001) and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of its own overrides the base's on purpose
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                break  # unhashable: SafeLoader's own error follows
            if key in seen:
                where = f"first at line {seen[key].start_mark.line + 1}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice ({where}); keep one", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789."))


class YAMLFileError(ValueError):
    """A YAML file that cannot be read: the message starts with `file:line:column`."""


def load_yaml(path: str | Path) -> Any:
    """The content of the YAML file `path` (None when empty), read with `Loader`."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM is dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise YAMLFileError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise YAMLFileError(f"{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise YAMLFileError(f"{path}: {e}") from None
