"""The one YAML reader of our configs (detectron2's and the ImageNet recipes): safe tags only, at most
:data:`MAX_BYTES`, and aliases expanding to at most :data:`MAX_NODES` values (an anchor bomb), counted on the
composed node graph before anything is built. Every error is a one-line :class:`YAMLFileError`
naming file and line; the line of every mapping key is returned too, for later checks to name.
"""
import os
from typing import Any, Dict, Tuple

import yaml

__all__ = ['MAX_BYTES', 'MAX_NODES', 'YAMLFileError', 'UnsafeYAMLError', 'read_yaml_file', 'read_yaml_text',
           'short_repr']

MAX_BYTES = 1 << 20  # 1 MiB: our largest config is 3 KB
MAX_NODES = 100_000  # values after alias expansion: a full detectron2 config dump has about 1,500
KeyLines = Dict[Tuple[str, ...], int]


class YAMLFileError(ValueError):
    """A config file that cannot be read: missing, too large, not YAML, an alias bomb."""


class UnsafeYAMLError(YAMLFileError):
    """A config file with a YAML tag that would construct Python objects."""


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about user values."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


class _Loader(yaml.SafeLoader):
    path = ''


def _refuse_tag(loader: _Loader, suffix: str, node: yaml.Node) -> Any:
    tag = node.tag.replace('tag:yaml.org,2002:', '!!')
    raise UnsafeYAMLError(
        f"Refused config '{loader.path}' (line {node.start_mark.line + 1}): the YAML tag '{tag}' would run "
        f"code; configs are read with safe YAML only, so write the plain value instead.")


_Loader.add_multi_constructor('', _refuse_tag)  # every tag SafeLoader does not know


def _check_size(node: yaml.Node, path: str, sizes: Dict[int, int], active: set) -> int:
    """The number of values ``node`` expands to, each node counted once (linear in the graph); recursion
    is safe: PyYAML's composer already recursed as deep."""
    key = id(node)
    if key not in sizes:
        if key in active:
            raise YAMLFileError(f"Config '{path}' (line {node.start_mark.line + 1}): an alias refers to the value "
                                f"that contains it (a recursive structure); write the values out.")
        active.add(key)
        size = 1
        if not isinstance(node, yaml.ScalarNode):
            for child in ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                          else node.value):
                size += _check_size(child, path, sizes, active)
        active.discard(key)
        if size > MAX_NODES:
            raise YAMLFileError(
                f"Refused config '{path}' (line {node.start_mark.line + 1}): its aliases (*name) expand to more "
                f"than {MAX_NODES:,} values (an anchor bomb?); a config needs far fewer, so write the values out.")
        sizes[key] = size
    return sizes[key]


def _key_lines(root: yaml.Node) -> KeyLines:
    """``(key, subkey, ...) -> line`` of every string key of nested mappings (aliases followed)."""
    lines: KeyLines = {}
    stack = [((), root)]
    while stack:
        prefix, node = stack.pop()
        if not isinstance(node, yaml.MappingNode):
            continue
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = prefix + (key_node.value,)
                lines.setdefault(path, key_node.start_mark.line + 1)
                stack.append((path, value_node))
    return lines


def read_yaml_file(path: str) -> Tuple[Any, KeyLines]:
    """The data of the YAML file ``path`` (``{}`` when empty) and the line of each mapping key; raises
    :class:`UnsafeYAMLError` for a tag safe YAML does not construct, else :class:`YAMLFileError`."""
    if not os.path.isfile(path):
        raise YAMLFileError(f"Config file '{path}' does not exist: check the path (relative paths start at "
                            f"'{os.getcwd()}').")
    try:
        with open(path, 'rb') as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise YAMLFileError(f"Config file '{path}' cannot be read ({err.strerror}).") from None
    if len(raw) > MAX_BYTES:
        raise YAMLFileError(f"Refused config '{path}': it is over {MAX_BYTES // 1024} KiB, far more than a config "
                            f"needs; is it the right file?")
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as err:
        raise YAMLFileError(f"Config '{path}' is not UTF-8 text (byte {err.start}); is it the right file?") from None
    return read_yaml_text(text, path)


def read_yaml_text(text: str, path: str) -> Tuple[Any, KeyLines]:
    """:func:`read_yaml_file` for YAML already in memory (a command-line value); ``path`` names it in errors."""
    if len(text) > MAX_BYTES:
        raise YAMLFileError(f"Refused YAML in {path}: it is over {MAX_BYTES // 1024} KiB.")
    loader = _Loader(text)
    loader.path = path
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        _check_size(node, path, {}, set())
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f' line {mark.line + 1}' if mark is not None else ''
        raise YAMLFileError(f"Config '{path}'{where} is not valid YAML: {err.problem or err.context}; fix the "
                            f"syntax there.") from None
    except yaml.YAMLError as err:
        raise YAMLFileError(f"Config '{path}' is not valid YAML ({type(err).__name__}); fix its syntax.") from None
    except RecursionError:
        raise YAMLFileError(f"Config '{path}' is nested too deeply to be a config; is it the right file?") from None
    finally:
        loader.dispose()
    return data, _key_lines(node)
