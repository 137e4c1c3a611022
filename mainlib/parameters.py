"""Flat notebook parameters → nested config dataclasses.

A notebook's `parameters` cell holds flat names (`learning_rate`, `drop_ratio`) so papermill can set them;
each pipeline maps them onto its config with a table `name -> attribute path` (`("coarse", "corruption",
"drop_ratio")`). Unknown names are an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ParameterTable = Mapping[str, tuple[str, ...]]


def apply_parameters(config: Any, params: Mapping[str, Any], table: ParameterTable) -> None:
    """Set each parameter on `config` along its attribute path."""
    unknown = sorted(set(params) - set(table))
    if unknown:
        raise TypeError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(table)}")
    for name, value in params.items():
        *path, attribute = table[name]
        target = config
        for part in path:
            target = getattr(target, part)
        setattr(target, attribute, value)


def pick_parameters(namespace: Mapping[str, Any], table: ParameterTable) -> dict[str, Any]:
    """The table's parameters among a notebook's variables (`globals()`)."""
    return {name: namespace[name] for name in table if name in namespace}
