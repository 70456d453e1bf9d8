"""The import graph of maformer_zoo and detectron2_ext, read from the source (every ``import``, at module or
function level): no circle, model files reach the weights layer only through the builder, and no two
module-level functions share a name. Mutations caught: a function-level ``from .weights import ...`` in
cards.py (weights -> cards -> weights, the circle is named); ``from ..weights import ...`` in models/mscsa.py;
a second ``def load_checkpoint_file`` in training/checkpoint.py."""
import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('maformer_zoo', 'detectron2_ext')


def _modules():
    return {'.'.join(p.relative_to(ROOT).with_suffix('').parts).removesuffix('.__init__'): p
            for package in PACKAGES for p in sorted((ROOT / package).rglob('*.py'))}


def _imports(name, path, modules):
    """The modules of ours that ``name`` imports anywhere in its file."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for target in sorted(graph[node]):
            assert state.get(target) != 'open', 'import circle: ' + ' -> '.join(stack[stack.index(target):] + [target])
            if target not in state:
                visit(target)
        state[node] = 'done'
        stack.pop()

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_model_files_import_only_the_builder():
    modules = _modules()
    for name in ('maformer_zoo.models.maformer', 'maformer_zoo.models.mscsa'):
        ours = {m for m in _imports(name, modules[name], modules) if not m.startswith('maformer_zoo.layers')}
        assert ours == {'maformer_zoo.models._builder'}, (name, ours)


def test_no_two_functions_share_a_name():
    names = Counter(node.name for path in _modules().values() for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.FunctionDef) and not node.name.startswith('_'))
    assert not [n for n, count in names.items() if count > 1], [n for n, count in names.items() if count > 1]
