"""The configuration reference (``docs/configuration.md``), generated from the config schema.

Every key of ``Config`` with its type, default, allowed range and description, section by
section, straight from the pydantic models, so the reference cannot drift from what the loader
accepts. ``tests/test_config_reference.py`` fails when the committed file is stale; regenerate with

    python -m negatron.cluster.config_reference > docs/configuration.md
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from typing import Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import Config

HEADER = """# Configuration reference

Generated from the config schema (`cluster/config.py`, `cluster/serve_config.py`) by
`python -m negatron.cluster.config_reference > docs/configuration.md`; a test fails when this file
is stale. Set a key in a YAML file (`negatron train -c my.yaml`) or on the command line as
`section.key=value` (`negatron train trainer.max_steps=200`). Unknown keys, values out of range,
`.nan`/`.inf` and duplicate keys are refused with one line naming the key.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type_name(a) for a in inner)
        return f"{text} or null" if len(inner) < len(args) else text
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}" if args else "map"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _range(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None and isinstance(m, (at.Ge, at.Gt, at.Le, at.Lt, at.Interval)):
                parts.append(f"{sign} {v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{sign} {v}")
        if isinstance(m, at.MinLen):
            parts.append(f"length ≥ {m.min_length}")
        if isinstance(m, at.MaxLen):
            parts.append(f"length ≤ {m.max_length}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    text = json.dumps(value, default=str)
    return f"`{text}`"


def _section_model(tp: Any) -> type[BaseModel] | None:
    return tp if inspect.isclass(tp) and issubclass(tp, BaseModel) else None


def rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, range, description) for the leaf keys of ``model``; sub-sections are
    listed by ``sections``."""
    out = []
    for name, field in model.model_fields.items():
        if _section_model(field.annotation) is not None:
            continue
        out.append((f"{prefix}{name}", _type_name(field.annotation), _default(field), _range(field),
                    " ".join((field.description or "").split())))
    return out


def sections(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) of every section, depth first, in declaration order."""
    out = []
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is not None:
            out.append((f"{prefix}{name}", sub))
            out += sections(sub, f"{prefix}{name}.")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def render() -> str:
    lines = [HEADER]
    lines.append("Sections: " + ", ".join(f"[`{name}`](#{name.replace('.', '')})" for name, _ in sections()) + ".\n")
    for name, model in sections():
        lines.append(f"## {name}\n")
        doc = model.__dict__.get("__doc__")
        if doc:
            lines.append(" ".join(doc.split()) + "\n")
        body = rows(model, f"{name}.")
        if not body:
            lines.append("(only sub-sections)\n")
            continue
        lines.append("| key | type | default | range | description |")
        lines.append("|---|---|---|---|---|")
        for key, tp, default, rng, desc in body:
            lines.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(rng)} | {_cell(desc)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
