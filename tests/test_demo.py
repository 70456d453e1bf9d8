"""`make demo` (scripts/demo.py) end to end on a tiny schedule, and its config."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.detectron2
pytest.importorskip('detectron2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')


def test_demo_config_builds_the_model_it_describes():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from detectron2_ext import add_maformer_zoo_config

    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(DEMO_CONFIG)
    assert cfg.MODEL.TIMM.NAME == 'resnet18_mscsa' and cfg.MODEL.FPN.FUSION == 'fine'
    assert cfg.MODEL.MASK_ON and not cfg.MODEL.TIMM.PRETRAINED and cfg.MODEL.DEVICE == 'cpu'
    assert cfg.DATALOADER.NUM_WORKERS == 0 and cfg.TEST.EVAL_PERIOD == 0
    model = build_model(cfg)
    assert list(model.backbone.output_shape()) == ['p2', 'p3', 'p4', 'p5', 'p6']
    assert cfg.MODEL.BACKBONE.NAME == 'build_timm_fpn_backbone'
    assert model.roi_heads.box_predictor.num_classes == 3


def _run_demo(output_dir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'demo.py'), '--output-dir', str(output_dir),
           '--max-iter', '2', '--num-train', '4', '--num-val', '2', '--image-size', '64',
           '--threads', '1', *extra]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_demo_runs_end_to_end_and_never_overwrites_a_run(tmp_path):
    """Data, 2 training iterations, AP, the picture, the summary; a rerun goes next to the first
    run, and gives the same numbers (seeded)."""
    proc = _run_demo(tmp_path / 'demo', 'SOLVER.IMS_PER_BATCH', '2')
    assert 'box  AP' in proc.stdout and 'mask AP' in proc.stdout
    assert 'trained 2 iterations' in proc.stdout
    assert '[demo] training Mask R-CNN' in proc.stderr  # the progress bar
    assert 'Warning' not in proc.stderr  # library warnings go to the log
    for path in ('predictions.png', 'results.json', 'model/model_final.pth', 'model/metrics.json',
                 'model/config.yaml', 'log.txt', 'data/val/instances.json'):
        assert os.path.isfile(tmp_path / 'demo' / path), path
    figures = sorted(os.listdir(tmp_path / 'demo' / 'figures'))
    assert any('fine' in f for f in figures) and all(f.endswith('.png') for f in figures), figures
    first = json.loads((tmp_path / 'demo' / 'results.json').read_text())
    assert first['iterations'] == 2 and 0 <= first['box_AP'] <= 100

    _run_demo(tmp_path / 'demo', 'SOLVER.IMS_PER_BATCH', '2')
    second = json.loads((tmp_path / 'demo-2' / 'results.json').read_text())
    assert json.dumps(second['results']) == json.dumps(first['results'])  # NaN-safe
