"""No stale pointer: every link of README.md and docs/*.md, and every repository path, ``file.md#anchor``
and ``maformer_zoo.`` / ``detectron2_ext.`` dotted name in the code's docstrings and comments, resolves.

Mutations caught: a renamed heading (its anchor), a moved file, a function moved to another module
(``render_model_card`` once), a pointer written as ``file.md, "Section"``.
"""
import ast
import glob
import io
import os
import re
import tokenize

import pytest

from conftest import ROOT
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
CODE_DIRS = ('maformer_zoo', 'detectron2_ext', 'scripts', 'benchmarks', 'dev')
CODE = sorted(p for d in CODE_DIRS for p in glob.glob(os.path.join(ROOT, d, '**', '*.py'), recursive=True))
PACKAGES = ('maformer_zoo', 'detectron2_ext')
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r'^(```|~~~).*?^\1', re.S | re.M)
# a path-like token (a/b/c.ext, a/b/, x.md) with an optional #anchor
PATH = re.compile(r'(?<![\w/.~$<{-])((?:[A-Za-z_][\w.-]*/)+(?:[\w.*-]*[\w*])?|[\w.-]+\.md)(#[\w-]+)?')
DOTTED = re.compile(r'(?<![\w.])((?:maformer_zoo|detectron2_ext)(?:\.\w+)+)')
# the old pointer style: a page and a quoted section name instead of an anchor
SECTION_BY_NAME = re.compile(r'(?:\.md|README),?\s+"')
# where a path's first folder may start: the repository, or inside one of our packages
TOP_LEVEL = {name for name in os.listdir(ROOT)
             if not name.startswith('.') and name not in ('output', 'build', 'dist') and 'egg-info' not in name}
PACKAGE_LEVEL = {name: [os.path.join(ROOT, pkg) for pkg in PACKAGES if os.path.exists(os.path.join(ROOT, pkg, name))]
                 for pkg in PACKAGES for name in os.listdir(os.path.join(ROOT, pkg))}


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def _anchors(path: str) -> set:
    with open(path, encoding='utf-8') as f:
        text = FENCE.sub('', f.read())
    anchors, seen = set(), {}
    for heading in re.findall(r'^#{1,6}\s+(.+?)\s*#*\s*$', text, re.M):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f'{slug}-{count}')
    return anchors


def _links(path: str):
    with open(path, encoding='utf-8') as f:
        text = FENCE.sub('', f.read())
    text = re.sub(r'`[^`\n]*`', '', text)  # inline code is not a link
    return LINK.findall(text)


def _check_target(path: str, anchor: str, shown: str) -> str:
    """'' when ``path`` exists (and has the heading ``anchor``), else what is wrong."""
    if not glob.glob(path):
        return f'{shown}: no such file'
    if anchor and path.endswith('.md') and anchor not in _anchors(path):
        return f'{shown}: no heading with anchor #{anchor}'
    return ''


def test_slug_follows_github():
    assert _slug('The generated dataset (`detectron2_ext/data`)') == \
        'the-generated-dataset-detectron2_extdata'
    assert _slug('FLOPs, latency and memory (Faster R-CNN R50, 800x1333)') == \
        'flops-latency-and-memory-faster-r-cnn-r50-800x1333'


@pytest.mark.parametrize('page', PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part \
            else page
        broken.append(_check_target(path, anchor, target))
    broken = [b for b in broken if b]
    assert not broken, f'{os.path.relpath(page, ROOT)}: ' + '; '.join(broken)


def _code_text(path: str) -> str:
    """The comments and string literals (docstrings included) of a Python file."""
    with open(path, 'rb') as f:
        tokens = tokenize.tokenize(io.BytesIO(f.read()).readline)
        kinds = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, 'FSTRING_MIDDLE', -1)}
        return '\n'.join(tok.string for tok in tokens if tok.type in kinds)


def _page_text(path: str) -> str:
    with open(path, encoding='utf-8') as f:
        return f.read()


def _resolve_path(token: str, anchor: str, source: str) -> str:
    """'' when a path named in ``source`` exists, else what is wrong; paths that do not start at
    a folder of this repository (output folders, user files, URLs) are not ours to check."""
    first = token.split('/')[0]
    if '/' not in token:  # a bare page name: next to the naming file, in docs/, or at the root
        if not anchor:  # output files (report.md) are named too; links are checked above
            return ''
        bases = [os.path.dirname(source), os.path.join(ROOT, 'docs'), ROOT]
    elif first in TOP_LEVEL:
        bases = [ROOT]
    elif first in PACKAGE_LEVEL:
        bases = PACKAGE_LEVEL[first]
    else:
        return ''
    problems = [_check_target(os.path.join(base, token), anchor.lstrip('#'), token + anchor) for base in bases]
    return '' if '' in problems else problems[0]


def _module_names(module_path: str) -> set:
    """Names a module defines or imports at its top level (its importable attributes)."""
    with open(module_path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split('.')[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _resolve_dotted(name: str) -> str:
    """'' when ``maformer_zoo.a.b[.attr]`` names a module, or an attribute its module defines."""
    parts = name.split('.')
    for i in range(len(parts), 0, -1):
        base = os.path.join(ROOT, *parts[:i])
        module = base + '.py' if os.path.isfile(base + '.py') else os.path.join(base, '__init__.py')
        if os.path.isfile(module):
            if i == len(parts) or parts[i].startswith('__') or parts[i] in _module_names(module):
                return ''
            if os.path.isdir(base) and os.path.exists(os.path.join(base, parts[i])):
                return ''
            return f'{name}: {".".join(parts[:i])} has no {parts[i]!r}'
    return f'{name}: no such module'


def _stale_pointers(path: str) -> list:
    text = _code_text(path) if path.endswith('.py') else _page_text(path)
    if path.endswith('.md'):
        text = FENCE.sub('', text)
    problems = []
    for match in PATH.finditer(text):
        token = match.group(1).rstrip('.')
        if text[match.end():match.end() + 1] in ('{', '<', '['):  # a pattern: maformer_{s,b,l}.yaml
            token += '*'
        problems.append(_resolve_path(token, match.group(2) or '', path))
    for match in DOTTED.finditer(text):
        problems.append(_resolve_dotted(match.group(1).rstrip('.')))
    for match in SECTION_BY_NAME.finditer(text):
        line = text[max(0, match.start() - 40):match.end() + 30].replace('\n', ' ').strip()
        problems.append(f'...{line}...: name the section as file.md#anchor')
    return sorted({p for p in problems if p})


def test_pointer_checker_catches_stale_pointers(tmp_path):
    """The checker itself: each kind of stale pointer is reported once, live ones are not."""
    page = tmp_path / 'page.md'
    page.write_text('`docs/mscsa.md#choices-the-paper-leaves-open` `docs/mscsa.md#no-such-section`\n'
                    '`maformer_zoo/layers/nosuch.py` `layers/fine.py` `output/demo/` (generated)\n'
                    '`configs/imagenet/maformer_{s,b,l}.yaml` `maformer_zoo.layers.fine.FINE`\n'
                    '`maformer_zoo.weights.no_such_function`\n'
                    'see docs/necks.md, "Export"\n', encoding='utf-8')
    problems = _stale_pointers(str(page))
    assert len(problems) == 4, problems
    assert 'docs/mscsa.md#no-such-section: no heading with anchor #no-such-section' in problems
    assert "maformer_zoo.weights.no_such_function: maformer_zoo.weights has no 'no_such_function'" in problems
    assert 'maformer_zoo/layers/nosuch.py: no such file' in problems
    assert any(p.endswith('necks.md, "Export"...: name the section as file.md#anchor') for p in problems)


@pytest.mark.parametrize('path', CODE + PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_named_paths_and_anchors_resolve(path):
    problems = _stale_pointers(path)
    assert not problems, f'{os.path.relpath(path, ROOT)}: ' + '; '.join(problems)


@pytest.mark.parametrize('path', [p for p in CODE if p.startswith(os.path.join(ROOT, PACKAGES[0]))
                                  or p.startswith(os.path.join(ROOT, PACKAGES[1]))], ids=lambda p: os.path.relpath(p, ROOT))
def test_module_docstrings_are_short(path):
    """Issue 21: a module docstring says what, the paper and table, and links to docs/ (<= 12
    lines); the argument lives in docs/. Mutation caught: the 50-line docstring of layers/mscsa.py."""
    with open(path, encoding='utf-8') as f:
        body = ast.parse(f.read()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines = body[0].end_lineno - body[0].lineno + 1
        assert lines <= 12, f'{os.path.relpath(path, ROOT)}: module docstring of {lines} lines'
