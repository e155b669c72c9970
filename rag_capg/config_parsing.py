"""Turn a flat dataclass config into a command line: RECIPE.yaml, key=value overrides and --flags.

Precedence, lowest first: the dataclass defaults, the YAML recipe, then ``key=value`` and ``--key value``
in the order given. Every field's ``metadata["help"]`` becomes its ``--help`` line, and a ``Literal``
field lists its choices, so ``rag-capg <command> --help`` documents every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from rag_capg.errors import InputError

C = TypeVar("C")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, *, name: str, source: str | None = None) -> Any:
    """Check and convert ``value`` to the field type ``tp``; raise InputError naming the field."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise InputError("must not be empty", file=source, field=name)
    origin = get_origin(tp)
    try:
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices:
                raise InputError(f"{value!r} is not one of {list(choices)}", file=source, field=name)
            return value
        if origin in (list, tuple):
            (item_tp, *_) = get_args(tp) or (str,)
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce(v, item_tp, name=name, source=source) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        return value
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a valid {getattr(tp, '__name__', tp)}", file=source,
                         field=name) from None


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(cls: type[C], values: dict[str, Any], *, source: str | None = None) -> C:
    """Build ``cls`` from a dict, rejecting unknown keys and ill-typed values with an InputError."""
    types_ = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise InputError(f"unknown option (known: {', '.join(sorted(known))})", file=source, field=key)
        kwargs[key] = coerce(value, types_[key], name=key, source=source)
    try:
        return cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as err:
        raise InputError(str(err), file=source) from None


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe_and_overrides", nargs="*", metavar="RECIPE.yaml | key=value",
                        help="an optional YAML recipe, then any number of key=value overrides")
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(types_[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "metavar": f.name.upper()}
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs.pop("metavar")
        if get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
        parser.add_argument(f"--{f.name.replace('_', '-')}", help=f"{help_text} (default: {default!r})",
                            **kwargs)
    return parser


def parse_config(cls: type[C], argv: list[str] | None, *, prog: str, description: str = "") -> C:
    """Parse ``[RECIPE.yaml] [key=value ...] [--key value ...]`` into the dataclass ``cls``."""
    parser = build_parser(cls, prog, description or (cls.__doc__ or ""))
    ns = parser.parse_intermixed_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for token in ns.recipe_and_overrides:
        if "=" in token:
            key, _, raw = token.partition("=")
            values[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw else ""
            sources[key.strip().replace("-", "_")] = "command line"
        elif token.endswith((".yaml", ".yml")):
            path = Path(token)
            if not path.is_file():
                raise InputError("recipe file not found", file=token)
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                line = getattr(getattr(err, "problem_mark", None), "line", None)
                raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}", file=token,
                                 line=None if line is None else line + 1) from None
            if not isinstance(loaded, dict):
                raise InputError("a recipe must be a mapping of option: value", file=token)
            for key in loaded:
                sources[str(key).replace("-", "_")] = token
            values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        else:
            raise InputError(f"expected a .yaml recipe or key=value, got {token!r}")
    for key, value in vars(ns).items():
        if key != "recipe_and_overrides":
            values[key] = value
            sources[key] = "command line"
    # Validate each value against the file it came from, so an error names the recipe.
    types_ = _field_types(cls)
    for key, value in list(values.items()):
        if key in types_:
            values[key] = coerce(value, types_[key], name=key, source=sources.get(key))
    return config_from_dict(cls, values, source=", ".join(sorted(set(sources.values()))) or None)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
