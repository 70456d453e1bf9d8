"""What the tests share: the repository root, the environment scripts run in, the detectron2
config loader and the generated COCO-style dataset.

Test files import the helpers (``from conftest import ROOT``: pytest puts tests/ on ``sys.path``)
and get the fixtures by name.
"""
import os
import pathlib
from typing import Any, Dict

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def script_env(**extra: str) -> Dict[str, str]:
    """The environment of a script run as a subprocess: this checkout's code first on PYTHONPATH
    (not an installed copy), plus ``extra`` variables."""
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def load_d2_config(path, *opts: Any):
    """A detectron2 config as ``scripts/train_net.py`` reads it (``detectron2_ext.config_file.
    load_config``: our keys, safe YAML, keys checked): ``path`` relative to the repository root
    (or absolute), then ``KEY VALUE`` overrides."""
    from detectron2_ext.config_file import load_config
    return load_config(str(ROOT / path), list(opts))


@pytest.fixture(scope='session')
def coco(tmp_path_factory) -> Dict[str, Any]:
    """A generated COCO-style dataset (``write_synthetic_coco``): 4 training and 2 validation
    scenes of 96x128, seed 0; ``{'root': folder, 'train': ..., 'val': ...}`` (the writer's paths).
    Shared by every test that asks for it: read it, never write into it."""
    pytest.importorskip('detectron2')
    from detectron2_ext.data import write_synthetic_coco
    root = str(tmp_path_factory.mktemp('synthetic_coco'))
    return dict(root=root,
                train=write_synthetic_coco(root, num_images=4, image_size=(96, 128), seed=0, split='train'),
                val=write_synthetic_coco(root, num_images=2, image_size=(96, 128), seed=0, split='val'))
