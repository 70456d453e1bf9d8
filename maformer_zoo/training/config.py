"""Options from a YAML recipe and the command line, as timm's ``train.py`` reads them: the recipe
given with ``-c`` sets the parser's defaults, then argparse parses the command line.

Precedence, lowest first: the dataclass defaults, the recipe (its ``_BASE_`` chain merged first, paths
relative to the file), the command line. Recipes are read with :mod:`maformer_zoo.utils.safe_yaml`;
their values are converted by the field's type (YAML 1.1 reads ``1e-3`` as a string) and an unknown
key or a bad value is one line naming the file and line.
"""
import argparse
import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, Optional, Sequence, Tuple, Type, TypeVar

from ..utils.safe_yaml import YAMLFileError, read_yaml_file, read_yaml_text, short_repr

__all__ = ['ConfigError', 'load_yaml_config', 'config_from_dict', 'parse_config']

C = TypeVar('C')


class ConfigError(ValueError):
    """A recipe or command-line value that does not fit; ``key``: the field it is about, if one."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return (args[0], True) if typing.get_origin(tp) is typing.Union and len(args) == 1 else (tp, False)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (from YAML or the command line) as the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ('none', 'null', '~', '')):
        if optional:
            return None
        raise ConfigError(f"'{name}' cannot be empty (null).", key=name)
    origin = typing.get_origin(base)
    try:
        if base is bool and not isinstance(value, bool):
            value = {'1': True, 'true': True, 'yes': True, 'on': True, '0': False, 'false': False, 'no': False,
                     'off': False}[str(value).strip().lower()]
        elif base is int and (isinstance(value, float) or (isinstance(value, str) and 'e' in value.lower())):
            value = float(value)
            value = int(value) if value.is_integer() else int('not an integer')
        elif base in (int, float, str):
            value = base(value)
        elif origin in (list, dict) and isinstance(value, str):  # '[0.5, 1.0]', '{a: 1}' or '0.5,1.0'
            value = read_yaml_text(value, f'--{name.replace("_", "-")}')[0] if value.strip()[:1] in '[{' \
                else value.split(',')
        if origin is list:
            item = typing.get_args(base)[0]
            return [_coerce(v, item, name) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if origin is dict and not isinstance(value, dict):
            raise ValueError(value)
    except YAMLFileError as err:
        raise ConfigError(str(err), key=name) from None
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"'{name}': cannot read {short_repr(value)} as {getattr(tp, '__name__', tp)}; give a "
                          f"value of that type.", key=name) from err
    return value


def _load_recipe(path: str, chain: Sequence[str] = ()) -> Tuple[Dict[str, Any], Dict[str, Tuple[str, int]]]:
    """The recipe merged over its ``_BASE_`` chain and, per key, the (file, line) its value comes from."""
    referrer = f" (the _BASE_ of '{chain[-1]}')" if chain else ''
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}'{referrer} does not exist: check the path"
                          f"{' (a _BASE_ is relative to the file that names it)' if chain else ''}.")
    try:
        data, lines = read_yaml_file(path)
    except YAMLFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config '{path}'{referrer} holds a {type(data).__name__}, not a mapping of "
                          f"field: value; write one `field: value` per line.")
    origins = {str(key): (path, lines.get((key,), 0)) for key in data if key != '_BASE_'}
    base = data.pop('_BASE_', None)
    if base is None:
        return data, origins
    where = f"Config '{path}' line {lines.get(('_BASE_',), '?')}"
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: _BASE_ is {short_repr(base)}; it must be one file path.")
    base_path = os.path.abspath(os.path.join(os.path.dirname(path), base))
    if base_path == path or base_path in chain:
        cycle = ' -> '.join(os.path.basename(p) for p in (*chain, path, base_path))
        raise ConfigError(f"{where}: _BASE_ makes a cycle ({cycle}); remove the _BASE_ that points back.")
    merged, merged_origins = _load_recipe(base_path, (*chain, path))
    return {**merged, **data}, {**merged_origins, **origins}


def load_yaml_config(path: str) -> Dict[str, Any]:
    """A recipe's values with its ``_BASE_`` chain merged (the file's own keys win)."""
    return _load_recipe(os.path.abspath(path))[0]


def _fields(cls: Type) -> Dict[str, Tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def config_from_dict(cls: Type[C], values: Dict[str, Any]) -> C:
    """``cls`` from ``values`` over its defaults; an unknown key names the closest fields."""
    fields = _fields(cls)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            raise ConfigError(f"Unknown config field(s) for {cls.__name__}: '{key}'"
                              + (f" (did you mean {', '.join(close)}?)" if close else ''), key=key)
    return cls(**{k: _coerce(v, fields[k][0], k) for k, v in values.items()})


def _recipe_defaults(cls: Type, path: str) -> Dict[str, Any]:
    """The recipe's values, converted; a bad one is an error naming its file and line."""
    values, origins = _load_recipe(os.path.abspath(path))
    try:
        cfg = config_from_dict(cls, values)
    except ConfigError as err:
        where, line = origins.get(err.key or '', (os.path.abspath(path), 0))
        raise ConfigError(f"Config '{where}'{f' line {line}' if line else ''}: {err}", key=err.key) from None
    return {k: getattr(cfg, k) for k in values}


def parse_config(cls: Type[C], argv: Optional[Sequence[str]] = None, description: str = '') -> C:
    """``-c recipe.yaml`` as the defaults of ``--field-name`` options, then the command line, as ``cls``.

    Raises ConfigError for a recipe that is missing, malformed or does not fit ``cls``; a bad command-line
    value exits with argparse's usage message.
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('-c', '--config', default='', help='YAML recipe (may name another under _BASE_)')
    known, rest = first.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=description, parents=[first])
    for name, (tp, f) in _fields(cls).items():
        base, optional = _unwrap_optional(tp)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = dict(dest=name, default=default, help=f.metadata.get('help', ''))
        if base is bool and not optional:
            kwargs['action'] = argparse.BooleanOptionalAction
        else:
            kwargs.update(metavar='V', nargs='+' if typing.get_origin(base) is list else None)
            kwargs['help'] += ' (default: %(default)s)'
        parser.add_argument('--' + name.replace('_', '-'), **kwargs)
    if known.config:
        parser.set_defaults(**_recipe_defaults(cls, known.config))
    values = vars(parser.parse_args(rest))
    values.pop('config')
    try:
        return config_from_dict(cls, values)
    except ConfigError as err:
        parser.error(str(err))
