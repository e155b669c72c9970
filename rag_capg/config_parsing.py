"""Turn flat dataclass configs into a command line: RECIPE.yaml, key=value overrides and --flags.

Precedence, lowest first: the dataclass defaults, the YAML recipe, then ``key=value`` and ``--key value``
in the order given. Every field's ``metadata["help"]`` becomes its ``--help`` line, and a ``Literal``
field lists its choices, so ``rag-capg <command> --help`` documents every option. Like transformers'
HfArgumentParser, one command line may fill several dataclasses (option groups shared between commands,
e.g. the data and judge options of train and eval): each key goes to every class that declares it, and
one recipe holds them all, flat. A boolean flag given alone (``--resume``) means true; an option name
must be spelt out in full (no argparse prefix matching).
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
from rag_capg.io import read_text

C = TypeVar("C")


class Options:
    """Base of every option group: ``__post_init__`` checks are cooperative, so a config made of several
    groups (``class EvalConfig(DataArguments, JudgeArguments, ...)``) runs each group's checks once. A group
    overrides ``check`` (raising InputError naming the field) and calls ``super().check()``."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        pass


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
            if item_tp is dict or get_origin(item_tp) is dict:  # a list of mappings: an error names the entry
                return [coerce(v, item_tp, name=f"{name}[{i}]", source=source) for i, v in enumerate(value)]
            return [coerce(v, item_tp, name=name, source=source) for v in value]
        if tp is dict or origin is dict:  # a mapping, or its YAML text ("{lsr: bm25, weight: 1.0}")
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as err:
                    raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}", file=source,
                                     field=name) from None
            if not isinstance(value, dict):
                raise InputError(f"expected a mapping {{key: value, ...}}, got {value!r}", file=source, field=name)
            return value
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
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a valid {getattr(tp, '__name__', tp)}", file=source,
                         field=name) from None


def _field_types(classes: tuple[type, ...]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in classes:
        hints.update(typing.get_type_hints(cls))
    return hints


def _as_tuple(classes: type | tuple[type, ...]) -> tuple[type, ...]:
    return (classes,) if isinstance(classes, type) else tuple(classes)


def config_from_dict(classes: type[C] | tuple[type, ...], values: dict[str, Any], *, source: str | None = None):
    """Build ``classes`` (one dataclass or a tuple of them) from one flat dict, rejecting unknown keys and
    ill-typed values with an InputError. A key goes to every class that has a field of that name."""
    group = _as_tuple(classes)
    types_ = _field_types(group)
    kwargs = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in types_:
            raise InputError(f"unknown option (known: {', '.join(sorted(types_))})", file=source, field=key)
        kwargs[key] = coerce(value, types_[key], name=key, source=source)
    built = []
    for cls in group:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            built.append(cls(**{k: v for k, v in kwargs.items() if k in names}))
        except InputError:
            raise
        except (TypeError, ValueError) as err:
            raise InputError(str(err), file=source) from None
    return built[0] if isinstance(classes, type) else tuple(built)


def build_parser(classes: type | tuple[type, ...], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe_and_overrides", nargs="*", metavar="RECIPE.yaml | key=value",
                        help="an optional YAML recipe, then any number of key=value overrides")
    group = _as_tuple(classes)
    types_ = _field_types(group)
    seen: set[str] = set()
    for f in (f for cls in group for f in dataclasses.fields(cls)):
        if f.name in seen:
            continue
        seen.add(f.name)
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
        if tp is bool:  # --flag alone means true; --flag false still works
            kwargs.update(nargs="?", const="true")
        parser.add_argument(f"--{f.name.replace('_', '-')}", help=f"{help_text} (default: {default!r})",
                            **kwargs)
    return parser


def parse_config(classes: type[C] | tuple[type, ...], argv: list[str] | None, *, prog: str,
                 description: str = ""):
    """Parse ``[RECIPE.yaml] [key=value ...] [--key value ...]`` into the dataclass ``classes`` (or, given a
    tuple of dataclasses, into a tuple of instances, one per class)."""
    group = _as_tuple(classes)
    parser = build_parser(group, prog, description or (group[-1].__doc__ or ""))
    ns = parser.parse_intermixed_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for token in ns.recipe_and_overrides:
        if "=" in token:
            key, _, raw = token.partition("=")
            values[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw else ""
            sources[key.strip().replace("-", "_")] = "command line"
        elif token.endswith((".yaml", ".yml")) or find_recipe(token) is not None:
            loaded = read_recipe(token)
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
    types_ = _field_types(group)
    for key, value in list(values.items()):
        if key in types_:
            values[key] = coerce(value, types_[key], name=key, source=sources.get(key))
    return config_from_dict(classes, values, source=", ".join(sorted(set(sources.values()))) or None)


RECIPES = Path(__file__).parent / "recipes"


def find_recipe(token: str) -> Path | None:
    """The recipe a command-line token names: a YAML file that exists, else a recipe shipped with the package
    by its name (``demo``, ``demo.yaml`` or ``recipes/demo.yaml`` -> rag_capg/recipes/demo.yaml); None if
    neither. So the README's ``rag-capg train recipes/demo.yaml`` works from any folder."""
    path = Path(token)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return path
    shipped = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if "=" not in token and shipped.is_file() else None


def read_recipe(token: str) -> dict[str, Any]:
    """A recipe's flat mapping of option: value (see find_recipe for what ``token`` may be)."""
    path = find_recipe(token)
    if path is None:
        known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise InputError(f"recipe file not found (recipes shipped with rag-capg: {known})", file=token)
    text = read_text(path, what="YAML recipe")  # bad bytes: an InputError naming the line
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}", file=token,
                         line=None if line is None else line + 1) from None
    if not isinstance(loaded, dict):
        raise InputError("a recipe must be a mapping of option: value", file=token)
    return loaded
