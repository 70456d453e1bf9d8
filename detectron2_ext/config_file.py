"""Loading a detectron2 config without running code from it, and with one-line errors.

detectron2's ``merge_from_file`` falls back to ``yaml.unsafe_load`` when a file has a Python tag
(``!!python/object/apply:...``), which runs code. :func:`load_config` reads every file of the
``_BASE_`` chain with :func:`maformer_zoo.utils.safe_yaml.read_yaml_file` (safe tags, size and
alias limits), checks every key of the files and of the ``KEY VALUE`` overrides against the config
before merging (a typo gets the close names), and merges with detectron2's own
``merge_from_other_cfg`` / ``merge_from_list``. Every error is one line naming the file, the line
of the key and what to do, also for the values detectron2 (yacs) refuses.
"""
import os
from typing import Any, Dict, List, Sequence, Tuple

from detectron2.config import CfgNode, get_cfg

from maformer_zoo.errors import UnsafeCheckpointError
from maformer_zoo.utils.names import close_names_hint
from maformer_zoo.utils.safe_yaml import UnsafeYAMLError, YAMLFileError, read_yaml_file, short_repr

from .config import add_maformer_zoo_config

__all__ = ['load_config', 'load_yaml_with_base', 'check_keys', 'ConfigFileError', 'UnsafeConfigError',
           'UnknownConfigKeyError']

# A config file that is unreadable or malformed (syntax, _BASE_, a value of the wrong type): one
# family for the reader's and our own checks.
ConfigFileError = YAMLFileError
# where each dotted key of a merged config came from: (file, line)
Origins = Dict[str, Tuple[str, int]]


class UnsafeConfigError(UnsafeCheckpointError):
    """A config file with a YAML tag that would construct Python objects; refused."""


class UnknownConfigKeyError(KeyError):
    """A config key that does not exist (a typo, or a key of another project)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _merge_into(src: Dict[str, Any], dst: Dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(value, dst[key])
        else:
            dst[key] = value


def _dotted_keys(data: Dict[str, Any], prefix: str = '') -> List[str]:
    keys = []
    for key, value in data.items():
        keys += _dotted_keys(value, f'{prefix}{key}.') if isinstance(value, dict) else [prefix + str(key)]
    return keys


def _load_with_origins(path: str, chain: Tuple[str, ...]) -> Tuple[Dict[str, Any], Origins]:
    try:
        data, lines = read_yaml_file(path)
    except UnsafeYAMLError as err:
        raise UnsafeConfigError(str(err)) from None
    if not isinstance(data, dict):
        via = f" (the _BASE_ of '{chain[-2]}')" if len(chain) > 1 else ''
        raise ConfigFileError(f"Config '{path}'{via} holds a {type(data).__name__}, not a mapping of KEY: value; "
                              f"write it as detectron2 configs are (e.g. `MODEL:` then indented keys).")
    origins = {key: (path, lines.get(tuple(key.split('.')), lines.get((key.split('.')[0],), 0)))
               for key in _dotted_keys(data)}
    base = data.pop('_BASE_', None)
    origins.pop('_BASE_', None)
    if base is None:
        return data, origins
    where = f"Config '{path}' (line {lines.get(('_BASE_',), '?')})"
    if not isinstance(base, str) or not base:
        raise ConfigFileError(f"{where}: _BASE_ is {short_repr(base)}; it must be one file path (a string), "
                              f"relative to the file; chain files to combine several.")
    base = os.path.expanduser(base)
    base_path = os.path.abspath(base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base))
    if base_path in chain:
        cycle = ' -> '.join(os.path.basename(p) for p in chain + (base_path,))
        raise ConfigFileError(f"{where}: _BASE_ makes a cycle ({cycle}); remove the _BASE_ that points back.")
    if not os.path.isfile(base_path):
        raise FileNotFoundError(f"{where}: _BASE_ file '{base_path}' does not exist; fix the path (it is "
                                f"relative to the file's folder).")
    merged, merged_origins = _load_with_origins(base_path, chain + (base_path,))
    _merge_into(data, merged)
    merged_origins.update(origins)
    return merged, merged_origins


def load_yaml_with_base(path: str) -> Dict[str, Any]:
    """The dict of ``path`` with its ``_BASE_`` chain applied (relative bases are relative to the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    return _load_with_origins(os.path.abspath(path), (os.path.abspath(path),))[0]


def _all_keys(node: CfgNode, prefix: str = '') -> List[str]:
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, CfgNode):
            keys += _all_keys(value, prefix + key + '.')
    return keys


def _unknown(cfg: CfgNode, key: str, source: str) -> UnknownConfigKeyError:
    return UnknownConfigKeyError(f"Unknown config key '{key}' in {source}{close_names_hint(key, _all_keys(cfg), 0.7)}.")


def check_keys(cfg: CfgNode, keys: Sequence[str], source: str) -> None:
    """Raise :class:`UnknownConfigKeyError` (with close names) for the first dotted key ``cfg`` lacks."""
    for full_key in keys:
        node = cfg
        for part in full_key.split('.'):
            if not isinstance(node, CfgNode) or part not in node:
                if isinstance(node, CfgNode) and node.is_new_allowed():
                    break
                raise _unknown(cfg, full_key, source)
            node = node[part]


def _get(cfg: CfgNode, key: str) -> Any:
    for part in key.split('.'):
        cfg = cfg[part] if isinstance(cfg, CfgNode) and part in cfg else None
    return cfg


def _nested(key: str, value: Any) -> Dict[str, Any]:
    for part in reversed(key.split('.')):
        value = {part: value}
    return value


def _wrong_value(cfg: CfgNode, key: str, value: Any, where: str) -> ConfigFileError:
    default = _get(cfg, key)
    kind = type(default).__name__
    expected = (f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} like its default {short_repr(default)}"
                if not isinstance(default, CfgNode) else "a mapping of sub-keys")
    return ConfigFileError(f"{where}: {key} is {short_repr(value)} ({type(value).__name__}), but detectron2 "
                           f"expects {expected}; change the value.")


def _merge_file(cfg: CfgNode, loaded: Dict[str, Any], origins: Origins, config_file: str) -> None:
    """detectron2's merge of ``loaded``; on a value it refuses, find the key from our own state."""
    try:
        cfg.merge_from_other_cfg(CfgNode(loaded))
        return
    except (ValueError, AssertionError, KeyError, TypeError):
        pass
    # Which key: merge each one alone into a copy of the config as it was before this file.
    for key in _dotted_keys(loaded):
        value = _get_plain(loaded, key)
        try:
            cfg.clone().merge_from_other_cfg(CfgNode(_nested(key, value)))
        except (ValueError, AssertionError, KeyError, TypeError):
            path, line = origins.get(key, ('?', 0))
            raise _wrong_value(cfg, key, value, f"Config '{path}' line {line}") from None
    raise ConfigFileError(f"detectron2 refused the values of '{config_file}' (with its _BASE_ chain); "
                          f"check the types of its keys against `python -c 'from detectron2.config import get_cfg; "
                          f"print(get_cfg())'`.")


def _get_plain(data: Dict[str, Any], key: str) -> Any:
    for part in key.split('.'):
        data = data[part]
    return data


def _merge_overrides(cfg: CfgNode, opts: Sequence[str]) -> None:
    if len(opts) % 2 or any(str(k).startswith('-') for k in opts[0::2]):
        flags = [str(k) for k in opts if str(k).startswith('--')]
        if flags:
            raise ConfigFileError(
                f"{flags[0]} comes after the KEY VALUE overrides, where it is read as a config key: put "
                f"{' '.join(flags)} before them.")
        raise ConfigFileError(f"Overrides come in KEY VALUE pairs; got an odd number ({len(opts)}): "
                              f"{short_repr(' '.join(map(str, opts)), 200)}; add the missing value.")
    check_keys(cfg, [str(k) for k in opts[0::2]], 'the command line')
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, AssertionError, KeyError, TypeError):
            raise _wrong_value(cfg, str(key), value, f"Command line `{key} {short_repr(value)}`") from None


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """``get_cfg()`` + :func:`add_maformer_zoo_config` + ``config_file`` (safe YAML) + ``opts``, not frozen.

    Raises:
        FileNotFoundError: a file of the ``_BASE_`` chain is missing.
        UnsafeConfigError: a file has a YAML tag that constructs Python objects.
        UnknownConfigKeyError: a key of a file or of ``opts`` does not exist (close names suggested).
        ConfigFileError: a file is malformed (syntax, size, aliases, ``_BASE_``) or a value has the
            wrong type; ``opts`` are not KEY VALUE pairs.
    """
    cfg = add_maformer_zoo_config(get_cfg())
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file '{config_file}' does not exist.")
    path = os.path.abspath(config_file)
    loaded, origins = _load_with_origins(path, (path,))
    version = loaded.get('VERSION', cfg.VERSION)
    if version != cfg.VERSION:
        raise ConfigFileError(f"Config '{config_file}' is VERSION {short_repr(version)}; this detectron2 reads "
                              f"VERSION {cfg.VERSION}: port the file (detectron2's config/compat.py) or drop the key.")
    for key in _dotted_keys(loaded):
        file, line = origins.get(key, (config_file, 0))
        check_keys(cfg, [key], f"'{file}' line {line}")
    _merge_file(cfg, loaded, origins, config_file)
    _merge_overrides(cfg, list(opts))
    return cfg
