"""Run configuration: a dataclass, YAML recipes with ``base:`` inheritance, command-line overrides.

Precedence, lowest first: the dataclass defaults, the YAML file given by ``--config`` (after its
``base:`` chain is merged), then every ``--field-name value`` on the command line. Every field of
the dataclass is a command-line option, generated from the field's type, so a recipe never holds a
setting the command line cannot change.

YAML values are coerced with the same rules as command-line strings, which also turns PyYAML's
``1e-3`` (a *string* under YAML 1.1) into the float the field expects. Unknown keys are errors that
name the closest field, so a typo in a recipe cannot be silently ignored. Recipes are read with
:mod:`maformer_zoo.utils.safe_yaml`; every recipe error is one line naming the file and line.
"""
import argparse
import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from ..utils.safe_yaml import YAMLFileError, read_yaml_file, read_yaml_text, short_repr

__all__ = ['ConfigError', 'load_yaml_config', 'config_from_dict', 'add_config_arguments', 'parse_config']

C = TypeVar('C')
_NONE_STRINGS = ('none', 'null', '~', '')


class ConfigError(ValueError):
    """A recipe or command-line value that does not fit the run configuration.

    ``key``: the field it is about, when it is about one (so the caller can add the recipe line).
    """

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


def _safe_load_value(value: str, name: str) -> Any:
    """A command-line YAML value (``[0.5, 1.0]``, ``{a: 1}``) with the recipes' limits."""
    try:
        return read_yaml_text(value, f'--{name.replace("_", "-")}')[0]
    except YAMLFileError as err:
        raise ConfigError(str(err), key=name) from None


def _unwrap_optional(tp: Any):
    """``Optional[X]`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
        if optional:
            return None
        raise ConfigError(f"'{name}' cannot be empty (null).", key=name)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ('1', 'true', 'yes', 'on'):
                return True
            if text in ('0', 'false', 'no', 'off'):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and 'e' in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if origin in (list, tuple, List, Sequence) or base in (list, tuple):
            (item_tp,) = typing.get_args(base)[:1] or (Any,)
            if isinstance(value, str):
                value = _safe_load_value(value, name) if value.strip().startswith('[') else value.split(',')
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [v if item_tp is Any else _coerce(v, item_tp, name) for v in value]
        if origin in (dict, Dict) or base is dict:
            if isinstance(value, str):
                value = _safe_load_value(value, name)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"'{name}': cannot read {short_repr(value)} as {getattr(tp, '__name__', tp)}; give "
                          f"a value of that type.", key=name) from err
    return value


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_config(path: str) -> Dict[str, Any]:
    """Read a YAML recipe and merge its ``base:`` chain (paths relative to the file, str or list).

    Later bases override earlier ones and the file's own keys override all bases.
    """
    return _load_recipe(os.path.abspath(path), ())[0]


def _load_recipe(path: str, chain: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Tuple[str, int]]]:
    """The merged recipe and, per key, the (file, line) its value comes from."""
    referrer = f" (a base of '{chain[-1]}')" if chain else ''
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}'{referrer} does not exist: check the path"
                          f"{' (bases are relative to the file that names them)' if chain else ''}.")
    try:
        data, lines = read_yaml_file(path)
    except YAMLFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config '{path}'{referrer} holds a {type(data).__name__}, not a mapping of "
                          f"field: value; write one `field: value` per line.")
    origins = {str(key): (path, lines.get((key,), 0)) for key in data}
    bases = data.pop('base', None) or []
    origins.pop('base', None)
    if isinstance(bases, str):
        bases = [bases]
    where = f"Config '{path}' line {lines.get(('base',), '?')}"
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{where}: base is {short_repr(bases)}; it must be a file path or a list of paths.")
    merged: Dict[str, Any] = {}
    merged_origins: Dict[str, Tuple[str, int]] = {}
    for base in bases:
        base_path = os.path.abspath(base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base))
        if base_path == path or base_path in chain:
            cycle = ' -> '.join(os.path.basename(p) for p in list(chain) + [path, base_path])
            raise ConfigError(f"{where}: 'base:' makes a cycle ({cycle}); remove the base that points back.")
        values, value_origins = _load_recipe(base_path, list(chain) + [path])
        merged = _merge(merged, values)
        merged_origins.update(value_origins)
    merged_origins.update(origins)
    return _merge(merged, data), merged_origins


def _fields(cls: Type) -> Dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def config_from_dict(cls: Type[C], values: Dict[str, Any], base: Optional[C] = None) -> C:
    """Build ``cls`` from ``values`` on top of ``base`` (or the defaults); unknown keys are errors."""
    fields = _fields(cls)
    unknown = [k for k in values if k not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hints.append(f"'{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ''))
        raise ConfigError(f"Unknown config field(s) for {cls.__name__}: {'; '.join(hints)}", key=unknown[0])
    coerced = {k: _coerce(v, fields[k].type, k) for k, v in values.items()}
    return dataclasses.replace(base, **coerced) if base is not None else cls(**coerced)


def add_config_arguments(parser: argparse.ArgumentParser, cls: Type) -> None:
    """Add ``--field-name`` for every dataclass field; values stay strings until coerced.

    Defaults are ``argparse.SUPPRESS`` so only options actually given override the recipe.
    """
    for name, f in _fields(cls).items():
        base, optional = _unwrap_optional(f.type)
        option = '--' + name.replace('_', '-')
        help_text = (f.metadata.get('help', '') + f' (default: {_default_repr(f)})').strip()
        if base is bool and not optional:
            parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) in (list, tuple, List, Sequence):
            parser.add_argument(option, dest=name, nargs='+', default=argparse.SUPPRESS,
                                metavar='V', help=help_text)
        else:
            parser.add_argument(option, dest=name, default=argparse.SUPPRESS, metavar='V', help=help_text)


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return 'required'


def parse_config(cls: Type[C], argv: Optional[Sequence[str]] = None, description: str = '') -> C:
    """Parse ``--config recipe.yaml`` plus per-field overrides into ``cls``.

    Raises:
        ConfigError: the recipe is missing or malformed, or one of its keys or values does not fit
            ``cls`` (the message names the file and the line). A bad command-line value exits with
            argparse's usage message.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('-c', '--config', default='', help='YAML recipe (may name others under base:)')
    add_config_arguments(parser, cls)
    args = vars(parser.parse_args(argv))
    recipe = args.pop('config')
    values, origins = _load_recipe(os.path.abspath(recipe), ()) if recipe else ({}, {})
    try:
        cfg = config_from_dict(cls, values)
    except ConfigError as err:
        path, line = origins.get(err.key or '', (os.path.abspath(recipe), 0))
        raise ConfigError(f"Config '{path}'{f' line {line}' if line else ''}: {err}", key=err.key) from None
    try:
        return config_from_dict(cls, args, base=cfg)
    except ConfigError as err:
        parser.error(str(err))
