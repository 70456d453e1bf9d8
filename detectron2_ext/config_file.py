"""Loading a detectron2 config without running code from it, and with close-name suggestions.

detectron2's ``merge_from_file`` falls back to ``yaml.unsafe_load`` when a file has a Python tag
(``!!python/object/apply:...``), which runs code. :func:`load_config` reads every file of the
``_BASE_`` chain with a ``yaml.SafeLoader`` that refuses any tag it does not know, checks every
key of the files and of the ``KEY VALUE`` overrides against the config before merging (a typo
gets the close names), and merges with detectron2's own ``merge_from_other_cfg`` /
``merge_from_list``.
"""
import os
from typing import Any, Dict, List, Sequence

import yaml
from detectron2.config import CfgNode, get_cfg

from maformer_zoo.errors import UnsafeCheckpointError
from maformer_zoo.utils.names import close_names_hint

from .config import add_maformer_zoo_config

__all__ = ['load_config', 'load_yaml_with_base', 'check_keys', 'UnsafeConfigError', 'UnknownConfigKeyError']


class UnsafeConfigError(UnsafeCheckpointError):
    """A config file with a YAML tag that would construct Python objects; refused."""


class UnknownConfigKeyError(KeyError):
    """A config key that does not exist (a typo, or a key of another project)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose error for an unknown tag names the file and the tag."""

    path = ''


def _refuse_tag(loader: _SafeLoader, suffix: str, node: yaml.Node) -> Any:
    tag = node.tag.replace('tag:yaml.org,2002:', '!!')
    raise UnsafeConfigError(
        f"Refused config '{loader.path}' (line {node.start_mark.line + 1}): the YAML tag '{tag}' would run "
        f"code; configs are read with safe YAML only, so write the plain value instead.")


_SafeLoader.add_multi_constructor('', _refuse_tag)  # every tag SafeLoader does not know


def _read_yaml(path: str) -> Dict[str, Any]:
    loader_cls = type('_FileLoader', (_SafeLoader,), {'path': path})
    with open(path, encoding='utf-8') as f:
        data = yaml.load(f, Loader=loader_cls)  # noqa: S506 - a SafeLoader subclass
    return data or {}


def _merge_into(src: Dict[str, Any], dst: Dict[str, Any]) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge_into(value, dst[key])
        else:
            dst[key] = value


def load_yaml_with_base(path: str) -> Dict[str, Any]:
    """The dict of ``path`` with its ``_BASE_`` chain applied (relative bases are relative to the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    data = _read_yaml(path)
    base = data.pop('_BASE_', None)
    if base is None:
        return data
    base = os.path.expanduser(base)
    merged = load_yaml_with_base(base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base))
    _merge_into(data, merged)
    return merged


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


def _dotted_keys(data: Dict[str, Any], prefix: str = '') -> List[str]:
    keys = []
    for key, value in data.items():
        keys += _dotted_keys(value, f'{prefix}{key}.') if isinstance(value, dict) else [prefix + key]
    return keys


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """``get_cfg()`` + :func:`add_maformer_zoo_config` + ``config_file`` (safe YAML) + ``opts``, not frozen.

    Raises:
        FileNotFoundError: a file of the ``_BASE_`` chain is missing.
        UnsafeConfigError: a file has a YAML tag that constructs Python objects.
        UnknownConfigKeyError: a key of a file or of ``opts`` does not exist (close names suggested).
    """
    cfg = add_maformer_zoo_config(get_cfg())
    loaded = load_yaml_with_base(config_file)
    version = loaded.get('VERSION', cfg.VERSION)
    if version != cfg.VERSION:
        raise ValueError(f"Config '{config_file}' is VERSION {version}; this detectron2 reads VERSION {cfg.VERSION}.")
    check_keys(cfg, _dotted_keys(loaded), f"'{config_file}'")
    cfg.merge_from_other_cfg(CfgNode(loaded))
    if len(opts) % 2:
        raise ValueError(f"Overrides come in KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    check_keys(cfg, list(opts[0::2]), 'the command line')
    cfg.merge_from_list(list(opts))
    return cfg
