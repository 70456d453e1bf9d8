"""Every relative link of README.md and docs/*.md points at an existing file (and heading)."""
import glob
import os
import re

import pytest

from conftest import ROOT
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r'^(```|~~~).*?^\1', re.S | re.M)


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
        if not os.path.exists(path):
            broken.append(f'{target}: no such file')
        elif anchor and path.endswith('.md') and anchor not in _anchors(path):
            broken.append(f'{target}: no heading with anchor #{anchor}')
    assert not broken, f'{os.path.relpath(page, ROOT)}: ' + '; '.join(broken)
