"""Loading a detectron2 config without running code from it (detectron2's ``merge_from_file`` falls back to
``yaml.unsafe_load``), with one-line errors: every file of the ``_BASE_`` chain is read with our safe YAML
reader, each key checked (a typo gets the close names) and merged with detectron2's own
``merge_from_other_cfg`` / ``merge_from_list`` one at a time, so a refused value is named with its file and line.
"""
import os
from typing import Any, Dict, Sequence, Tuple

from detectron2.config import CfgNode, get_cfg

from maformer_zoo.errors import UnsafeCheckpointError
from maformer_zoo.utils.names import close_names_hint
from maformer_zoo.utils.safe_yaml import UnsafeYAMLError, YAMLFileError, read_yaml_file, short_repr

from .config import add_maformer_zoo_config

__all__ = ['load_config', 'flatten_keys', 'UnsafeConfigError', 'UnknownConfigKeyError']
YACS_ERRORS = (ValueError, AssertionError, KeyError, TypeError)  # what yacs raises for a value it refuses


class UnsafeConfigError(UnsafeCheckpointError):
    """A config file with a YAML tag that would construct Python objects; refused."""


class UnknownConfigKeyError(KeyError):
    """A config key that does not exist (a typo, or a key of another project)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def flatten_keys(data: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """``{dotted key: value}`` of the leaves of nested mappings (an empty mapping is a leaf)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_keys(value, f'{prefix}{key}.'))
        else:
            flat[prefix + str(key)] = value
    return flat


def _read_chain(path: str, chain: Tuple[str, ...] = ()) -> Dict[str, Tuple[Any, str, int]]:
    """``{dotted key: (value, file, line)}`` of ``path`` with its ``_BASE_`` chain applied."""
    chain += (path,)
    try:
        data, lines = read_yaml_file(path)
    except UnsafeYAMLError as err:
        raise UnsafeConfigError(str(err)) from None
    if not isinstance(data, dict):
        via = f" (the _BASE_ of '{chain[-2]}')" if len(chain) > 1 else ''
        raise YAMLFileError(f"Config '{path}'{via} holds a {type(data).__name__}, not a mapping of KEY: value; "
                            f"write it as detectron2 configs are (e.g. `MODEL:` then indented keys).")
    base = data.pop('_BASE_', None)
    entries = {}
    if base is not None:
        where = f"Config '{path}' (line {lines.get(('_BASE_',), '?')})"
        if not isinstance(base, str) or not base:
            raise YAMLFileError(f"{where}: _BASE_ is {short_repr(base)}; it must be one file path (a string), "
                                f"relative to the file; chain files to combine several.")
        base_path = os.path.abspath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
        if base_path in chain:
            cycle = ' -> '.join(os.path.basename(p) for p in chain + (base_path,))
            raise YAMLFileError(f"{where}: _BASE_ makes a cycle ({cycle}); remove the _BASE_ that points back.")
        if not os.path.isfile(base_path):
            raise FileNotFoundError(f"{where}: _BASE_ file '{base_path}' does not exist; fix the path (it is "
                                    f"relative to the file's folder).")
        entries = _read_chain(base_path, chain)
    for key, value in flatten_keys(data).items():
        parts = tuple(key.split('.'))
        entries[key] = (value, path, lines.get(parts, lines.get(parts[:1], 0)))
    return entries


def _check_key(cfg: CfgNode, key: str, source: str) -> None:
    """:class:`UnknownConfigKeyError` (with close names) unless ``cfg`` has ``key`` or allows it as new."""
    node = cfg
    for part in key.split('.'):
        if not isinstance(node, CfgNode) or part not in node:
            if isinstance(node, CfgNode) and node.is_new_allowed():
                return
            raise UnknownConfigKeyError(
                f"Unknown config key '{key}' in {source}{close_names_hint(key, flatten_keys(cfg), 0.7)}.")
        node = node[part]


def _wrong_value(cfg: CfgNode, key: str, value: Any, where: str) -> YAMLFileError:
    default = cfg
    for part in key.split('.'):
        default = default[part] if isinstance(default, CfgNode) and part in default else None
    kind = type(default).__name__
    expected = (f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} like its default {short_repr(default)}"
                if not isinstance(default, CfgNode) else "a mapping of sub-keys")
    return YAMLFileError(f"{where}: {key} is {short_repr(value)} ({type(value).__name__}), but detectron2 "
                         f"expects {expected}; change the value.")


def _merge_overrides(cfg: CfgNode, opts: Sequence[str]) -> None:
    keys = [str(k) for k in opts[0::2]]
    if len(opts) % 2 or any(k.startswith('-') for k in keys):
        flags = [str(k) for k in opts if str(k).startswith('--')]
        if flags:
            raise YAMLFileError(f"{flags[0]} comes after the KEY VALUE overrides, where it is read as a config key: "
                                f"put {' '.join(flags)} before them.")
        raise YAMLFileError(f"Overrides come in KEY VALUE pairs; got an odd number ({len(opts)}): "
                            f"{short_repr(' '.join(map(str, opts)), 200)}; add the missing value.")
    for key in keys:
        _check_key(cfg, key, 'the command line')
    for key, value in zip(keys, opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except YACS_ERRORS:
            raise _wrong_value(cfg, key, value, f"Command line `{key} {short_repr(value)}`") from None


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """``get_cfg()`` + :func:`add_maformer_zoo_config` + ``config_file`` (safe YAML) + ``opts``, not frozen.
    Raises ``FileNotFoundError``, :class:`UnsafeConfigError`, :class:`UnknownConfigKeyError` or ``YAMLFileError``
    (malformed file, wrong value type, ``opts`` not in KEY VALUE pairs)."""
    cfg = add_maformer_zoo_config(get_cfg())
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file '{config_file}' does not exist.")
    entries = _read_chain(os.path.abspath(config_file))
    version = entries.get('VERSION', (cfg.VERSION,))[0]
    if version != cfg.VERSION:
        raise YAMLFileError(f"Config '{config_file}' is VERSION {short_repr(version)}; this detectron2 reads "
                            f"VERSION {cfg.VERSION}: port the file (detectron2's config/compat.py) or drop the key.")
    for key, (_, file, line) in entries.items():  # every key first: a typo is named before any value
        _check_key(cfg, key, f"'{file}' line {line}")
    for key, (value, file, line) in entries.items():
        nested = value
        for part in reversed(key.split('.')):
            nested = {part: nested}
        try:
            cfg.merge_from_other_cfg(CfgNode(nested))
        except YACS_ERRORS:
            raise _wrong_value(cfg, key, value, f"Config '{file}' line {line}") from None
    _merge_overrides(cfg, list(opts))
    return cfg
