"""Options from a YAML recipe and the command line, as timm's ``train.py`` reads them: the recipe given with
``-c`` (read by :mod:`maformer_zoo.utils.safe_yaml`, its ``_BASE_`` chain merged first) sets the argparse defaults,
then the command line is parsed. An unknown key or a bad value is one line naming the file and line.
"""
import argparse
import copy
import difflib
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from ..utils.safe_yaml import YAMLFileError, read_yaml_file, read_yaml_text, short_repr

__all__ = ['ConfigError', 'Settings', 'build_parser', 'parse_config']

Actions = Dict[str, argparse.Action]


class ConfigError(ValueError):
    """A recipe or option value that does not fit."""


def _none_or(base):
    def convert(value):
        return None if str(value).strip().lower() in ('none', 'null', '~', '') else base(value)
    convert.__name__ = base.__name__  # argparse names the type in its errors
    return convert


def integer(value) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)


def mapping(value) -> Dict[str, Any]:
    value = read_yaml_text(value, 'the command line')[0] if isinstance(value, str) else value
    if not isinstance(value, dict):
        raise ValueError(value)
    return dict(value)  # not the options table's default object


def build_parser(options: Sequence[tuple], **kwargs) -> Tuple[argparse.ArgumentParser, Actions]:
    """An argparse parser of ``(name, default, help[, type or choices])`` rows, and its actions by name."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
    actions = {}
    for name, default, text, *given in options:
        choices = given[0] if given and isinstance(given[0], tuple) else None
        kind = given[0] if given and choices is None else type(default)
        many = isinstance(kind, list) or isinstance(default, list)
        item = kind[0] if isinstance(kind, list) else type(default[0]) if many else kind
        item = {int: integer, dict: mapping}.get(item, item)
        args = dict(default=default, help=text, dest=name, choices=choices)
        if kind is bool:
            args['action'] = argparse.BooleanOptionalAction
        else:
            args.update(type=_none_or(item) if default is None else item, metavar='V', nargs='+' if many else None)
        actions[name] = parser.add_argument('--' + name.replace('_', '-'), **args)
    return parser, actions


def _convert(actions: Actions, key: str, value: Any, what: str) -> Any:
    if key not in actions:
        close = difflib.get_close_matches(key, list(actions), n=3)
        raise ConfigError(f"Unknown config field(s) for {what}: '{key}'"
                          + (f" (did you mean {', '.join(close)}?)" if close else ''))
    action, converted = actions[key], value
    try:
        if (action.type is None and not isinstance(value, bool)) or (value is None and action.default is not None):
            raise ValueError(value)
        if action.type is not None and value is not None:
            converted = [action.type(v) for v in (value if isinstance(value, (list, tuple)) else [value])] \
                if action.nargs == '+' else action.type(value)
        if action.choices and converted not in action.choices:
            raise ValueError(value)
    except (TypeError, ValueError) as err:  # YAMLFileError (a mapping option) included
        kind = 'true or false' if action.type is None else ' or '.join(action.choices or [action.type.__name__])
        raise ConfigError(f"'{key}': cannot read {short_repr(value)} as {kind}; give a value of that type.") from err
    return converted


class Settings(argparse.Namespace):
    """Settings of ``OPTIONS`` rows: ``Settings(**values)`` is their defaults updated with ``values``, checked."""
    OPTIONS: list = []

    def __init__(self, **values):
        actions = build_parser(self.OPTIONS)[1]
        super().__init__(**{**copy.deepcopy({k: a.default for k, a in actions.items()}),
                            **{k: _convert(actions, k, v, type(self).__name__) for k, v in values.items()}})


def _load_recipe(path: str, chain: Sequence[str] = ()) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The recipe merged over its ``_BASE_`` chain and, per key, where its value comes from."""
    referrer = f" (the _BASE_ of '{chain[-1]}')" if chain else ''
    if chain and not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}'{referrer} does not exist: check the path (a _BASE_ is relative to "
                          f"the file that names it).")
    try:
        data, lines = read_yaml_file(path)
    except YAMLFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config '{path}'{referrer} holds a {type(data).__name__}, not a mapping of field: value; "
                          f"write one `field: value` per line.")
    origins = {str(key): f"Config '{path}' line {lines.get((key,), '?')}" for key in data}
    base = data.pop('_BASE_', None)
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{origins['_BASE_']}: _BASE_ is {short_repr(base)}; it must be one file path.")
    base_path = os.path.abspath(os.path.join(os.path.dirname(path), base))
    if base_path in (path, *chain):
        cycle = ' -> '.join(os.path.basename(p) for p in (*chain, path, base_path))
        raise ConfigError(f"{origins['_BASE_']}: _BASE_ makes a cycle ({cycle}); remove the _BASE_ that points back.")
    merged, merged_origins = _load_recipe(base_path, (*chain, path))
    return {**merged, **data}, {**merged_origins, **origins}


def parse_config(cls: type, argv: Optional[Sequence[str]] = None, description: str = '') -> Any:
    """``cls`` from ``-c recipe.yaml`` as the defaults of its options (``cls.OPTIONS``), then the command line."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('-c', '--config', default='', help='YAML recipe (may name another under _BASE_)')
    known, rest = first.parse_known_args(argv)
    parser, actions = build_parser(cls.OPTIONS, description=description, parents=[first])
    if known.config:
        values, origins = _load_recipe(os.path.abspath(known.config))
        for key, value in values.items():
            try:
                parser.set_defaults(**{key: _convert(actions, key, value, cls.__name__)})
            except ConfigError as err:
                raise ConfigError(f'{origins[key]}: {err}') from None
    values = vars(parser.parse_args(rest))
    values.pop('config')
    return cls(**values)
