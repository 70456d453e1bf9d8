"""Claims that no other test ran (issue 22): the README model table, the model cards, every
config building, the dataset converter, and the benchmark scripts in their ``--tiny`` form.

Each test compares values (parameter counts from the code, the converter's boxes from the input
it was given, a benchmark's ratio from its own rows), and names the dev/mutations.py mutation it
catches where there is one.
"""
import glob
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import maformer_zoo
import timm

from conftest import ROOT, load_d2_config, script_env
ENV = script_env(OMP_NUM_THREADS='1')


def _script(*args, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------- README and model cards


def _readme_models():
    """The README's "Models" table as {model: (params, GMACs, activations)}."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    section = text.split('\n## Models\n', 1)[1].split('\n## ', 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r'\| `([a-z0-9_]+)` \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|', line)
        if match:
            rows[match.group(1)] = tuple(float(v) for v in match.group(2, 3, 4))
    return rows


def test_readme_model_table_matches_the_code():
    """Every registered model is in the README's table once; its parameter count is the model's
    own (built on the meta device: no memory, no time), and its GMACs and activations are the
    committed measurements (hub_cards/stats.json, which test_model_cards_are_current and
    ``dev/make_hub_cards.py --check`` keep current).

    Mutation caught (dev/mutations.py): ``readme-params-stale``.
    """
    rows = _readme_models()
    assert sorted(rows) == sorted(maformer_zoo.list_models())
    with open(os.path.join(ROOT, 'hub_cards', 'stats.json')) as f:
        stats = json.load(f)
    for name, (params, gmacs, acts) in rows.items():
        with torch.device('meta'):
            model = timm.create_model(name, pretrained=False)
        counted = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        assert (params, gmacs, acts) == (counted, stats[name]['gmacs'], stats[name]['macts']), name
        assert stats[name]['params_m'] == counted, name


def test_model_cards_are_current():
    """``dev/make_hub_cards.py --check`` re-measures the two smallest models and finds their
    committed cards current (all ten: the slow test below).

    Mutation caught (dev/mutations.py): ``hub-card-stale``.
    """
    _script(os.path.join(ROOT, 'dev', 'make_hub_cards.py'), '--check', '--models', 'resnet18_mscsa',
            'pvt_v2_b0_mscsa')


@pytest.mark.slow
def test_all_model_cards_are_current():
    _script(os.path.join(ROOT, 'dev', 'make_hub_cards.py'), '--check', timeout=3600)


# --------------------------------------------------------------------------------- every config

detectron2 = pytest.importorskip('detectron2')

# every model config: detection, panoptic and semantic segmentation, the demo (configs/imagenet
# holds training recipes, tested in test_imagenet_scripts.py; Base-* files are only inherited)
MODEL_CONFIGS = sorted(os.path.relpath(p, ROOT) for pattern in ('COCO-*', 'ADE20K-*', 'demo')
                       for p in glob.glob(os.path.join(ROOT, 'configs', pattern, '*.yaml')))


ON_META = ('MODEL.TIMM.PRETRAINED', 'False', 'MODEL.DEVICE', 'meta', 'MODEL.WEIGHTS', '')


def _kind(cfg):
    """(architecture, neck) and backbone of a config."""
    arch = (cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.ROI_HEADS.NAME if 'RCNN' in cfg.MODEL.META_ARCHITECTURE
            or cfg.MODEL.META_ARCHITECTURE == 'PanopticFPN' else '', cfg.MODEL.SEM_SEG_HEAD.NAME
            if cfg.MODEL.META_ARCHITECTURE == 'SemanticSegmentor' else '', cfg.MODEL.MASK_ON)
    backbone = cfg.MODEL.TIMM.NAME if 'timm' in cfg.MODEL.BACKBONE.NAME else cfg.MODEL.BACKBONE.NAME
    return (arch, cfg.MODEL.FPN.FUSION), backbone


def _build_and_check(rel, cfg):
    from detectron2.modeling import build_model
    from detectron2_ext.modeling.timm_backbone import TimmBackbone
    with torch.device('meta'):
        model = build_model(cfg)
    names = {n for n, _ in model.named_modules()}  # the neck, or UPerHead's own fusion
    assert any('fine' in n for n in names) == (cfg.MODEL.FPN.FUSION == 'fine'), rel
    assert any('asff' in n for n in names) == (cfg.MODEL.FPN.FUSION == 'asff'), rel
    timm_backbones = [m for m in model.backbone.modules() if isinstance(m, TimmBackbone)]
    if 'timm' in cfg.MODEL.BACKBONE.NAME:
        (bottom_up,) = timm_backbones
        assert bottom_up.model.pretrained_cfg['architecture'] == cfg.MODEL.TIMM.NAME, rel
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in ('GeneralizedRCNN', 'PanopticFPN', 'RetinaNet'):
        assert {s.channels for s in model.backbone.output_shape().values()} == {cfg.MODEL.FPN.OUT_CHANNELS}, rel
    if arch == 'RetinaNet':
        assert model.num_classes == cfg.MODEL.RETINANET.NUM_CLASSES, rel
    elif arch in ('GeneralizedRCNN', 'PanopticFPN'):
        predictor = model.roi_heads.box_predictor
        predictors = list(predictor) if isinstance(predictor, torch.nn.ModuleList) else [predictor]
        assert all(p.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES for p in predictors), rel
        assert model.roi_heads.mask_on == cfg.MODEL.MASK_ON, rel
    if arch in ('PanopticFPN', 'SemanticSegmentor'):
        assert model.sem_seg_head.predictor.out_channels == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, rel


def test_every_config_loads_and_each_kind_builds():
    """Every model config in configs/ loads with its keys checked (safe YAML, _BASE_ chains), and
    one config per (architecture, neck) and per backbone builds its whole model on the meta
    device (nothing allocated or initialised), with the config's neck, backbone, widths and class
    counts. All of them build in the slow test below; one per detector x neck also trains
    (test_detectron2_integration.py, test_fpn_variants.py).

    Mutation caught (dev/mutations.py): ``config-fpn-channels-ignored``.
    """
    assert len(MODEL_CONFIGS) >= 190
    covered, chosen = set(), []
    for rel in MODEL_CONFIGS:
        cfg = load_d2_config(rel, *ON_META)
        kind, backbone = _kind(cfg)
        if kind not in covered or backbone not in covered:
            covered |= {kind, backbone}
            chosen.append((rel, cfg))
    assert len(chosen) < len(MODEL_CONFIGS) / 3
    for rel, cfg in chosen:
        _build_and_check(rel, cfg)


@pytest.mark.slow
@pytest.mark.parametrize('rel', MODEL_CONFIGS)
def test_every_config_builds_on_the_meta_device(rel):
    _build_and_check(rel, load_d2_config(rel, *ON_META))


def _make_configs():
    spec = importlib.util.spec_from_file_location('make_configs', os.path.join(ROOT, 'dev', 'make_configs.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_hand_written_bases_under_generated_leaves(tmp_path):
    """Configs as detectron2 keeps them (issue 21): `_BASE_` is the only inheritance key, every chain
    ends in a hand-written file and every `Base-*.yaml` is hand-written (the generator writes leaves
    only); `dev/make_configs.py --check`'s comparison finds a leaf that differs, one that is missing
    and one it no longer writes. Mutation: stale_files without its left-over scan -> the planted file
    passes; a Base-* file generated again -> the first assertion fails."""
    from maformer_zoo.utils.safe_yaml import read_yaml_file
    make_configs = _make_configs()
    generated = make_configs.generate()
    assert len(generated) == 192 and not any(os.path.basename(rel).startswith('Base-') for rel in generated)
    bases = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs', '*.yaml')))
    for rel in MODEL_CONFIGS + bases:
        path = os.path.join(ROOT, rel)
        while True:
            data = read_yaml_file(path)[0]
            assert 'base' not in data, path
            if '_BASE_' not in data:
                break
            path = os.path.normpath(os.path.join(os.path.dirname(path), data['_BASE_']))
        assert os.path.relpath(path, os.path.join(ROOT, 'configs')) not in generated, rel
    configs = tmp_path / 'configs'
    shutil.copytree(os.path.join(ROOT, 'configs'), configs)
    assert make_configs.stale_files(str(configs)) == {}
    leaf = configs / 'COCO-InstanceSegmentation' / 'mask_rcnn_maformer_s_fpn_1x.yaml'
    leaf.write_text(leaf.read_text().replace('0.2', '0.25'))
    os.remove(configs / 'COCO-Detection' / 'retinanet_R_50_asff_fpn_1x.yaml')
    (configs / 'COCO-Detection' / 'old.yaml').write_text(make_configs.HEADER + 'SEED: 1\n')
    assert make_configs.stale_files(str(configs)) == {
        'COCO-InstanceSegmentation/mask_rcnn_maformer_s_fpn_1x.yaml': 'differs',
        'COCO-Detection/retinanet_R_50_asff_fpn_1x.yaml': 'missing',
        'COCO-Detection/old.yaml': 'left over (delete it)'}


# ---------------------------------------------------------------------------- dataset converter


def _write_voc(folder, stem, size, boxes):
    from PIL import Image
    Image.new('RGB', size, (40, 120, 40)).save(os.path.join(folder, f'{stem}.png'))
    objects = ''.join(
        f'<object><name>Tree</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>'
        f'<ymax>{b[3]}</ymax></bndbox></object>' for b in boxes)
    with open(os.path.join(folder, f'{stem}.xml'), 'w') as f:
        f.write(f'<annotation><filename>{stem}.png</filename>{objects}</annotation>')


def test_deepforest_converter_on_a_generated_photo(tmp_path):
    """datasets/deepforest_to_coco.py on a generated 100x60 photo with three boxes, 50-px tiles:
    two tiles (the 10-px rest joins its neighbour), each box in the tile that holds most of it,
    clipped and in tile coordinates; one tile per split."""
    data = tmp_path / 'data'
    data.mkdir()
    # box A inside tile 1; box B straddles the border at x=50 (60% in tile 2); box C mostly
    # outside its tile's visible share (kept nowhere at min-visible 0.5 with a 50/50 split)
    _write_voc(str(data), 'photo', (100, 60), [(5, 5, 25, 45), (40, 10, 65, 30), (45, 40, 55, 50)])
    out = tmp_path / 'coco'
    proc = _script(os.path.join(ROOT, 'datasets', 'deepforest_to_coco.py'), '--data-dir', data,
                   '--output', out, '--tile', '50', '--val-fraction', '0.5')
    assert 'train: 1 tiles' in proc.stdout and 'val: 1 tiles' in proc.stdout
    tiles = {}
    for split in ('train', 'val'):
        coco = json.loads((out / f'{split}.json').read_text())
        assert coco['categories'] == [dict(id=1, name='tree', supercategory='plant')]
        (image,) = coco['images']
        tiles[image['file_name']] = (image['width'], image['height'],
                                     sorted(tuple(a['bbox']) for a in coco['annotations']))
        assert (out / 'images' / image['file_name']).is_file()
    assert tiles == {
        'photo_00000_00000.png': (50, 60, [(5.0, 5.0, 20.0, 40.0)]),
        'photo_00050_00000.png': (50, 60, [(0.0, 10.0, 15.0, 20.0)]),
    }


# ------------------------------------------------------------------------ benchmarks, --tiny form


def test_mscsa_benchmark_tiny(tmp_path):
    """benchmarks/mscsa.py --tiny: one pair, every measurement; the ratios are the rows' own."""
    out = tmp_path / 'mscsa.json'
    _script(os.path.join(ROOT, 'benchmarks', 'mscsa.py'), '--tiny', '--json', out)
    (row,) = json.loads(out.read_text())
    assert row['model'] == 'resnet18'
    assert row['ratio'] == pytest.approx(row['ips_aug'] / row['ips_base'], rel=1e-9)
    assert row['cpu_ratio'] == pytest.approx(row['cpu_ips_aug'] / row['cpu_ips_base'], rel=1e-9)
    from maformer_zoo.utils import count_params
    with torch.device('meta'):
        assert row['params_base'] == count_params(timm.create_model('resnet18'))
        assert row['params_aug'] == count_params(timm.create_model('resnet18_mscsa'))
    assert row['peak_mib_aug'] > 0 and row['peak_mib_base'] > 0


def test_fashion_mnist_benchmark_tiny(tmp_path):
    """benchmarks/fashion_mnist.py --tiny: the generated IDX stand-in, one epoch of the training
    and validation scripts' functions, and the report: 40 train / 20 test images, 5 steps."""
    _script(os.path.join(ROOT, 'benchmarks', 'fashion_mnist.py'), '--tiny', '--out', tmp_path)
    report = json.loads((tmp_path / 'results.json').read_text())
    assert (report['train_images'], report['test_images']) == (40, 20)
    assert report['optimizer_steps'] == 40 // 8
    assert 0 <= report['test_top1'] <= 100  # random images: no accuracy value is known
    assert os.path.isfile(report['checkpoint'])


def test_profile_maformer_tiny(tmp_path):
    """benchmarks/profile_maformer.py --tiny (the op shares of docs/maformer.md): both settings,
    both models; each share is its group's seconds over the profiled total, and the groups do
    not overlap (their sum is at most the total)."""
    out = tmp_path / 'profile.json'
    _script(os.path.join(ROOT, 'benchmarks', 'profile_maformer.py'), '--tiny', '--json', out)
    rows = json.loads(out.read_text())
    assert [(r['setting'], r['model']) for r in rows] == [
        (s, m) for s in ('cls', 'det') for m in ('maformer_s', 'swin_tiny_patch4_window7_224')]
    groups = ('linear', 'attention', 'copy', 'gelu', 'convolution', 'layer_norm')
    for r in rows:
        assert r['linear_s'] > 0 and r['attention_s'] > 0
        for g in groups:
            assert r[f'{g}_share'] == pytest.approx(r[f'{g}_s'] / r['total_s'], rel=1e-9)
        assert sum(r[f'{g}_s'] for g in groups) <= r['total_s'] * (1 + 1e-9)
