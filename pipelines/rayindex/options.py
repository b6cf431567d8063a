"""Command-line options derived from the settings models (config.py): every field becomes a typer
option with its name (--field-name, or the flags of its cli() metadata), type, default and help, so a
default is written once, in the model. A command declares

    def search(query: str = typer.Argument(...), where: Annotated[dict, From(IndexLocation)] = None)

and receives the options that were given (as a dict, field name -> value) to validate into the model
with `settings()`; options left out keep the model's default.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Optional

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from rayindex.errors import UsageError


class From:
    """Marks a command parameter that receives the options of these model fields (all but excluded ones,
    or only included ones)."""

    def __init__(self, model: type[BaseModel], include: set[str] | None = None, exclude: set[str] = frozenset()):
        self.model, self.include, self.exclude = model, include, exclude

    def fields(self) -> dict[str, FieldInfo]:
        return {
            name: info
            for name, info in self.model.model_fields.items()
            if (self.include is None or name in self.include)
            and name not in self.exclude
            and (info.json_schema_extra or {}).get("cli", {}) is not None
        }


def settings(model: type[BaseModel], *values: dict) -> Any:
    """The model validated from option values (later dicts win); a bad value is a UsageError naming the option."""
    merged = {k: v for d in values for k, v in d.items() if v is not None}
    try:
        return model(**merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            info = model.model_fields.get(name)
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, list(model.model_fields), n=1)
                problems.append(
                    f"{name}: not a setting of {model.__name__}" + (f" (did you mean {close[0]}?)" if close else "")
                )
            else:
                problems.append(f"{option_decls(name, info)[0] if info else name or 'options'}: {err['msg']}")
        raise UsageError("; ".join(problems)) from None


def option_decls(name: str, info: FieldInfo) -> list[str]:
    declared = ((info.json_schema_extra or {}).get("cli") or {}).get("decls")
    return list(declared) if declared else [f"--{name.replace('_', '-')}"]


def _cli_type(info: FieldInfo) -> tuple[Any, dict]:
    """The Python type typer should parse, and extra typer.Option arguments (choices, metavar, envvar)."""
    meta = (info.json_schema_extra or {}).get("cli") or {}
    extra = {key: meta[key] for key in ("metavar", "envvar") if meta.get(key)}
    if meta.get("as_text"):
        return Optional[str], extra
    annotation = info.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:  # typer offers the choices
        return Optional[annotation], extra
    if typing.get_origin(annotation) is list:
        return Optional[list[typing.get_args(annotation)[0]]], extra
    return Optional[annotation], extra


def _shown_default(info: FieldInfo) -> str | bool:
    if info.is_required() or info.default is None:
        return False
    default = info.default
    return ", ".join(map(str, default)) if isinstance(default, list) else str(default)


def option_parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    annotation, extra = _cli_type(info)
    default = ... if info.is_required() else None  # None: not given, the model's default applies
    option = typer.Option(
        default, *option_decls(name, info), help=info.description, show_default=_shown_default(info), **extra
    )
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def with_options(fn: Callable) -> Callable:
    """Expand each parameter annotated Annotated[dict, From(Model, ...)] into the model's options."""
    hints = typing.get_type_hints(fn, include_extras=True)
    signature = inspect.signature(fn)
    groups: dict[str, From] = {}
    params: list[inspect.Parameter] = []
    for name, param in signature.parameters.items():
        marker = next((m for m in getattr(hints.get(name), "__metadata__", ()) if isinstance(m, From)), None)
        if marker is None:
            params.append(param.replace(annotation=hints.get(name, param.annotation)))
        else:
            groups[name] = marker
    for marker in groups.values():
        params += [option_parameter(name, info) for name, info in marker.fields().items()]
    names = [p.name for p in params] + list(groups)
    if len(names) != len(set(names)):
        raise TypeError(f"{fn.__name__}: two options share a name: {sorted(n for n in names if names.count(n) > 1)}")

    def command(**kwargs):
        for group, marker in groups.items():
            kwargs[group] = {name: kwargs.pop(name) for name in marker.fields() if kwargs.get(name) is not None}
            for name in marker.fields():
                kwargs.pop(name, None)
        return fn(**kwargs)

    command.__name__, command.__doc__, command.__module__ = fn.__name__, fn.__doc__, fn.__module__
    command.__signature__ = inspect.Signature(sorted(params, key=lambda p: p.kind))
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
