"""Semantic segmentation: the ADE20K config grid (Semantic FPN, UPerNet), the poly schedule, the
user-data registration and a 2-iteration train_net run on generated data that reports mIoU."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.detectron2
pytest.importorskip('detectron2')

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model, build_sem_seg_head  # noqa: E402
from detectron2.modeling.backbone import Backbone  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2_ext import add_maformer_zoo_config  # noqa: E402
from detectron2_ext.data import (  # noqa: E402
    register_sem_seg_dataset, set_sem_seg_num_classes, write_synthetic_coco,
    write_synthetic_sem_seg,
)
from detectron2_ext.engine.trainer import build_lr_scheduler  # noqa: E402
from detectron2_ext.modeling.fpn_variants import build_fusion_fpn  # noqa: E402
from detectron2_ext.modeling.semantic import UPerNetHead  # noqa: E402

from conftest import ROOT
CONFIGS = os.path.join(ROOT, 'configs')
SEMANTIC_DIR = os.path.join(CONFIGS, 'ADE20K-SemanticSegmentation')
GRID = sorted(f for f in os.listdir(SEMANTIC_DIR) if f.endswith('.yaml'))
FAST_BACKBONE = 'resnet18_mscsa'


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                OMP_NUM_THREADS='1')


def _cfg(path: str, *opts):
    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.merge_from_list(['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.DEVICE', 'cpu', *opts])
    return cfg


def test_grid_is_complete_and_generated():
    """10 backbones x 3 necks x (Semantic FPN 40k, 80k, UPerNet 160k), all as the generator writes."""
    assert len(GRID) == 90
    for family in ('semantic_fpn_{}_40k', 'semantic_fpn_{}_80k', 'upernet_{}_160k'):
        for neck in ('fpn', 'fine_fpn', 'asff_fpn'):
            assert family.format(f'maformer_s_{neck}') + '.yaml' in GRID
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'dev', 'make_configs.py'), '--check'],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_recipes():
    fpn40 = _cfg(os.path.join(SEMANTIC_DIR, 'semantic_fpn_pvt_v2_b1_mscsa_fpn_40k.yaml'))
    assert (fpn40.SOLVER.IMS_PER_BATCH, fpn40.SOLVER.BASE_LR, fpn40.SOLVER.WEIGHT_DECAY,
            fpn40.SOLVER.MAX_ITER, fpn40.SOLVER.LR_SCHEDULER_NAME, fpn40.SOLVER.POLY_LR_POWER,
            fpn40.SOLVER.WARMUP_ITERS) == (32, 2e-4, 1e-4, 40000, 'WarmupPolyLR', 0.9, 0)
    assert tuple(fpn40.INPUT.CROP.SIZE) == (512, 512) and fpn40.SOLVER.OPTIMIZER == 'AdamW'
    assert (fpn40.INPUT.SEM_SEG_PIPELINE, tuple(fpn40.INPUT.SEM_SEG_SCALE),
            tuple(fpn40.INPUT.SEM_SEG_RATIO_RANGE), fpn40.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            fpn40.INPUT.SEM_SEG_PHOTOMETRIC) == ('mmseg', (2048, 512), (0.5, 2.0), 0.75, True)
    assert (fpn40.MODEL.SEM_SEG_HEAD.NAME, fpn40.MODEL.SEM_SEG_HEAD.NORM,
            fpn40.MODEL.SEMANTIC_FPN.DROPOUT) == ('SemanticFPNHead', 'SyncBN', 0.1)
    fpn80 = _cfg(os.path.join(SEMANTIC_DIR, 'semantic_fpn_maformer_s_fine_fpn_80k.yaml'))
    assert (fpn80.SOLVER.IMS_PER_BATCH, fpn80.SOLVER.BASE_LR, fpn80.SOLVER.WEIGHT_DECAY,
            fpn80.SOLVER.MAX_ITER, fpn80.SOLVER.LR_SCHEDULER_NAME,
            fpn80.SOLVER.WARMUP_ITERS) == (16, 2e-4, 1e-4, 80000, 'WarmupCosineLR', 1000)
    uper = _cfg(os.path.join(SEMANTIC_DIR, 'upernet_maformer_b_asff_fpn_160k.yaml'))
    assert (uper.SOLVER.IMS_PER_BATCH, uper.SOLVER.BASE_LR, uper.SOLVER.WEIGHT_DECAY,
            uper.SOLVER.MAX_ITER, uper.SOLVER.LR_SCHEDULER_NAME, uper.SOLVER.POLY_LR_POWER,
            uper.SOLVER.WARMUP_ITERS) == (16, 6e-5, 0.01, 160000, 'WarmupPolyLR', 1.0, 1500)
    assert uper.MODEL.SEM_SEG_HEAD.NAME == 'UPerNetHead' and uper.MODEL.FPN.FUSION == 'asff'
    assert uper.MODEL.BACKBONE.NAME == 'build_timm_backbone'
    assert (uper.MODEL.UPERNET.AUX_IN_FEATURE, uper.MODEL.UPERNET.AUX_CHANNELS,
            uper.MODEL.UPERNET.AUX_LOSS_WEIGHT, uper.MODEL.UPERNET.DROPOUT,
            uper.MODEL.SEM_SEG_HEAD.CONVS_DIM) == ('res4', 256, 0.4, 0.1, 512)
    assert fpn40.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert fpn40.DATASETS.TRAIN == ('ade20k_raw_sem_seg_train',)
    assert set(fpn40.DATASETS.REDUCE_ZERO_LABEL) == {'ade20k_raw_sem_seg_train', 'ade20k_raw_sem_seg_val'}


@pytest.mark.parametrize('config', [
    pytest.param(c, marks=() if FAST_BACKBONE in c and not c.endswith('_80k.yaml')
                 else pytest.mark.slow) for c in GRID])
def test_config_builds_and_segments(config):
    """Every grid config builds (random weights) and predicts NUM_CLASSES maps at the input size."""
    cfg = _cfg(os.path.join(SEMANTIC_DIR, config), 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '7',
               'MODEL.TIMM.NORM', 'BN')
    model = build_model(cfg).eval()
    expected_fusion = config.split('_')[-3] if 'fine' in config or 'asff' in config else 'sum'
    if config.startswith('upernet_'):  # the fusion is the head's top-down merge; no FPN before it
        assert type(model.backbone).__name__ == 'TimmBackbone'
        assert model.sem_seg_head.fusion == expected_fusion
    else:
        assert model.backbone.fusion == expected_fusion
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = model([dict(image=image, height=96, width=128)])
    assert out[0]['sem_seg'].shape == (7, 96, 128)
    assert torch.isfinite(out[0]['sem_seg']).all()


def test_upernet_auxiliary_head_trains_only():
    """Training: main loss + 0.4 x the auxiliary FCN head's cross-entropy on res4; inference runs
    no auxiliary head. Catches: aux weight 1, aux on another stage, aux run at test."""
    cfg = _cfg(os.path.join(SEMANTIC_DIR, f'upernet_{FAST_BACKBONE}_fpn_160k.yaml'),
               'MODEL.SEM_SEG_HEAD.CONVS_DIM', '32', 'MODEL.UPERNET.AUX_CHANNELS', '16',
               'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '5', 'MODEL.SEM_SEG_HEAD.NORM', 'BN',
               'MODEL.TIMM.NORM', 'BN')
    model = build_model(cfg)
    head = model.sem_seg_head
    calls = []
    head.aux_head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    sem_seg = torch.randint(0, 5, (64, 64))
    inputs = [dict(image=image, sem_seg=sem_seg, height=64, width=64)] * 2
    head.aux_head.dropout.eval()  # deterministic, to recompute the loss below
    losses = model(inputs)
    assert calls == [model.backbone.output_shape()['res4'].channels]
    features = model.backbone((image.float()[None] - model.pixel_mean) / model.pixel_std)
    aux = torch.nn.functional.interpolate(head.aux_head(features['res4']), size=(64, 64),
                                          mode='bilinear', align_corners=False)
    expected = torch.nn.functional.cross_entropy(aux, sem_seg[None]) * 0.4
    assert losses['loss_sem_seg_aux'].item() == pytest.approx(expected.item(), rel=1e-4)
    calls.clear()
    model.eval()
    with torch.no_grad():
        model([dict(image=image, height=64, width=64)])
    assert calls == []


def test_upernet_fusion_replaces_the_top_down_sums():
    """FINE: one FINE per top-down merge (3, at 512 channels: 4C^2 + 4C parameters each) and
    nothing else added; ASFF: the ASFF of four 512-channel levels."""
    counts = {}
    for neck in ('fpn', 'fine_fpn', 'asff_fpn'):
        cfg = _cfg(os.path.join(SEMANTIC_DIR, f'upernet_{FAST_BACKBONE}_{neck}_160k.yaml'))
        with torch.device('meta'):
            head = build_sem_seg_head(cfg, _Stages(BACKBONE_WIDTHS[FAST_BACKBONE]).output_shape())
        counts[neck] = sum(p.numel() for p in head.parameters())
        if neck == 'fine_fpn':
            assert len(head.fine) == 3 and [f.kernel_size for f in head.fine] == [8, 2, 1]
    c = 512
    assert counts['fine_fpn'] - counts['fpn'] == 3 * (4 * c * c + 4 * c)
    # ASFF, 4 levels: per output level, 1x1 up-convs from coarser and one 3x3 s2 conv from each
    # finer level (with bias), plus a 1-channel weight conv per source
    up = 6 * (c * c + c)
    down = 6 * (9 * c * c + c)
    weights = 16 * (c + 1)
    assert counts['asff_fpn'] - counts['fpn'] == up + down + weights


def test_upernet_rejects_wrong_common_stride():
    cfg = _cfg(os.path.join(SEMANTIC_DIR, f'upernet_{FAST_BACKBONE}_fpn_160k.yaml'),
               'MODEL.SEM_SEG_HEAD.COMMON_STRIDE', '8')
    with pytest.raises(ValueError, match='COMMON_STRIDE is 8: set it to 4'):
        build_model(cfg)


def test_poly_schedule_follows_the_formula():
    """WarmupPolyLR: (1 - t / T) ** power, after detectron2's linear warm-up when there is one."""
    params = [torch.nn.Parameter(torch.zeros(1))]
    for warmup, power in ((0, 0.9), (10, 1.0)):
        cfg = add_maformer_zoo_config(get_cfg())
        cfg.merge_from_list(['SOLVER.LR_SCHEDULER_NAME', 'WarmupPolyLR', 'SOLVER.MAX_ITER', '100',
                             'SOLVER.BASE_LR', '0.1', 'SOLVER.WARMUP_ITERS', str(warmup),
                             'SOLVER.POLY_LR_POWER', str(power), 'SOLVER.WARMUP_FACTOR', '0.001'])
        optimizer = torch.optim.SGD(params, lr=0.1)
        scheduler = build_lr_scheduler(cfg, optimizer)
        lrs = []
        for _ in range(100):
            lrs.append(optimizer.param_groups[0]['lr'])
            optimizer.step()
            scheduler.step()
        for t in (20, 50, 90):
            assert lrs[t] == pytest.approx(0.1 * (1 - t / 100) ** power, rel=1e-6)
        if warmup:
            assert lrs[0] == pytest.approx(0.1 * 0.001, rel=1e-6) and lrs[5] < lrs[10]
        else:
            assert lrs[0] == pytest.approx(0.1)


@pytest.fixture(scope='module')
def sem_seg_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('sem_seg'))
    return dict(root=root, train=write_synthetic_sem_seg(root, 4, (96, 128), split='train'),
                val=write_synthetic_sem_seg(root, 2, (96, 128), split='val'))


def test_synthetic_labels_match_the_coco_scenes(sem_seg_data, tmp_path):
    """Same seed and split: the same images as write_synthetic_coco, labelled by category index."""
    coco = write_synthetic_coco(str(tmp_path), 4, (96, 128), split='train')
    names = sorted(os.listdir(coco['image_dir']))
    assert names == sorted(os.listdir(sem_seg_data['train']['image_dir']))
    seen = set()
    for name in names:
        a = np.asarray(Image.open(os.path.join(coco['image_dir'], name)))
        b = np.asarray(Image.open(os.path.join(sem_seg_data['train']['image_dir'], name)))
        assert np.array_equal(a, b)
        label = np.asarray(Image.open(os.path.join(sem_seg_data['train']['label_dir'],
                                                   name.replace('.jpg', '.png'))))
        separated = np.asarray(Image.open(os.path.join(coco['sem_seg_dir'],
                                                       name.replace('.jpg', '.png'))))
        # things (0..2 here) are class 0 of the separated labels, stuff 3..5 are 1..3 there
        assert np.array_equal(np.where(label < 3, 0, label - 2), separated)
        seen |= set(np.unique(label).tolist())
    assert seen <= set(range(6)) and {0, 1, 2} & seen and {3, 4} <= seen


def test_registration_checks_labels_against_the_class_count(sem_seg_data):
    train = sem_seg_data['train']
    register_sem_seg_dataset('semtest_small', train['image_dir'], train['label_dir'])
    with pytest.raises(ValueError, match=r"has class [345], but the model has 3 classes"):
        set_sem_seg_num_classes('semtest_small', 3)
    assert MetadataCatalog.get('semtest_small').get('stuff_classes', None) is None
    set_sem_seg_num_classes('semtest_small', 6)
    dicts = DatasetCatalog.get('semtest_small')
    assert len(dicts) == 4 and all(os.path.isfile(d['sem_seg_file_name']) for d in dicts)
    meta = MetadataCatalog.get('semtest_small')
    assert meta.evaluator_type == 'sem_seg' and meta.ignore_label == 255
    with pytest.raises(ValueError, match='has 6 classes but 7 were asked for'):
        set_sem_seg_num_classes('semtest_small', 7)


def test_registration_errors(sem_seg_data, tmp_path):
    train = sem_seg_data['train']
    with pytest.raises(FileNotFoundError, match='Label directory'):
        register_sem_seg_dataset('semtest_bad', train['image_dir'], str(tmp_path / 'nope'))
    (tmp_path / 'labels').mkdir()
    with pytest.raises(FileNotFoundError, match='have no label PNG of the same name'):
        register_sem_seg_dataset('semtest_bad', train['image_dir'], str(tmp_path / 'labels'))


def _train(data, config, output_dir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, 'scripts', 'train_net.py'),
           '--config-file', os.path.join(SEMANTIC_DIR, config),
           '--sem-seg-dataset', 'syn_train', data['train']['image_dir'], data['train']['label_dir'],
           '--sem-seg-dataset', 'syn_val', data['val']['image_dir'], data['val']['label_dir'],
           'DATASETS.TRAIN', '("syn_train",)', 'DATASETS.TEST', '("syn_val",)',
           'MODEL.TIMM.PRETRAINED', 'False', 'MODEL.TIMM.NORM', 'BN', 'MODEL.DEVICE', 'cpu',
           'MODEL.SEM_SEG_HEAD.NORM', 'BN', 'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.MAX_ITER', '2',
           'INPUT.CROP.SIZE', '(96,96)', 'INPUT.SEM_SEG_SCALE', '(256,96)', 'SEED', '0',
           'DATALOADER.NUM_WORKERS', '0', 'OUTPUT_DIR', output_dir, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


# (mIoU, fwIoU, pACC) of the seeded 2-iteration runs below (SEED 0, one thread, CPU), recorded
# 2026-12-02. Tolerance 1.0 point: floating-point summation order differs across CPUs / BLAS
# builds and flips a few of the 2 x 96 x 128 evaluated pixels; a wrong label reading, a
# missing ignore or a different pipeline moves these by far more.
RECORDED_METRICS = {
    f'semantic_fpn_{FAST_BACKBONE}_fine_fpn_40k.yaml': (31.32, 59.36, 71.23),
    f'semantic_fpn_{FAST_BACKBONE}_asff_fpn_40k.yaml': (29.83, 59.39, 76.73),
}


@pytest.mark.parametrize('config', sorted(RECORDED_METRICS))
def test_train_net_on_sem_seg_dataset_reports_miou(sem_seg_data, tmp_path, config):
    proc = _train(sem_seg_data, config, str(tmp_path / 'out'), 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '6')
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    match = re.search(r'copypaste: mIoU,fwIoU,mACC,pACC\s*\n.*copypaste: ([\d.]+),([\d.]+),([\d.]+),'
                      r'([\d.]+)', output)
    assert match, output[-3000:]
    miou, fwiou, macc, pacc = (float(v) for v in match.groups())
    print(f'{config}: mIoU {miou:.2f} fwIoU {fwiou:.2f} pACC {pacc:.2f}')
    assert (miou, fwiou, pacc) == pytest.approx(RECORDED_METRICS[config], abs=1.0)
    assert os.path.isfile(tmp_path / 'out' / 'model_final.pth')


def test_train_net_rejects_labels_outside_the_classes(sem_seg_data, tmp_path):
    proc = _train(sem_seg_data, f'semantic_fpn_{FAST_BACKBONE}_fpn_40k.yaml', str(tmp_path / 'out'),
                  'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '4')
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: Dataset 'syn_train': label file '.*' has class [45], but the model has 4 "
                    r"classes", last), proc.stderr[-2000:]
    assert not os.path.isfile(tmp_path / 'out' / 'model_final.pth')


# feature widths (res2..res5) of our 10 backbones, maformer_zoo.list_models() order; checked
# against the models by test_backbone_widths_are_the_models
BACKBONE_WIDTHS = {
    'convnext_tiny_mscsa': (96, 192, 384, 768), 'maformer_b': (64, 128, 320, 512),
    'maformer_l': (128, 192, 448, 640), 'maformer_s': (64, 128, 320, 512),
    'pvt_v2_b0_mscsa': (32, 64, 160, 256), 'pvt_v2_b1_mscsa': (64, 128, 320, 512),
    'pvt_v2_b2_mscsa': (64, 128, 320, 512), 'resnet18_mscsa': (64, 128, 256, 512),
    'resnet50_mscsa': (256, 512, 1024, 2048),
    'swin_tiny_patch4_window7_224_mscsa': (96, 192, 384, 768),
}


def _conv(c_in, c_out, k, norm=True):
    """mmcv ConvModule parameters: weight, then BN weight + bias (no conv bias) or a conv bias."""
    return k * k * c_in * c_out + (2 * c_out if norm else c_out)


def mmseg_uper_head_params(widths, num_classes, channels=512, aux_channels=256,
                           pool_scales=(1, 2, 3, 6)):
    """mmseg's UPerHead + auxiliary FCNHead, counted from their layer lists (uper_head.py,
    psp_head.py, fcn_head.py with num_convs=1, concat_input=False)."""
    *low, top = widths
    ppm = len(pool_scales) * _conv(top, channels, 1)
    bottleneck = _conv(top + len(pool_scales) * channels, channels, 3)
    laterals = sum(_conv(c, channels, 1) for c in low)
    fpn_convs = len(low) * _conv(channels, channels, 3)
    fpn_bottleneck = _conv(len(widths) * channels, channels, 3)
    conv_seg = _conv(channels, num_classes, 1, norm=False)
    aux = _conv(widths[2], aux_channels, 3) + _conv(aux_channels, num_classes, 1, norm=False)
    return ppm + bottleneck + laterals + fpn_convs + fpn_bottleneck + conv_seg + aux


def mmseg_semantic_fpn_params(widths, num_classes, fpn_channels=256, channels=128,
                              strides=(4, 8, 16, 32)):
    """mmseg's FPN neck (no norm: conv biases) + FPNHead (fpn.py, fpn_head.py)."""
    neck = sum(_conv(c, fpn_channels, 1, norm=False) + _conv(fpn_channels, fpn_channels, 3, norm=False)
               for c in widths)
    head = 0
    for stride in strides:
        convs = max(1, int(np.log2(stride) - 2))
        head += _conv(fpn_channels, channels, 3) + (convs - 1) * _conv(channels, channels, 3)
    return neck + head + _conv(channels, num_classes, 1, norm=False)


class _Stages(Backbone):
    """A stand-in backbone with given stage widths (only output_shape is read when building)."""

    def __init__(self, widths):
        super().__init__()
        self.shapes = {f'res{i + 2}': ShapeSpec(channels=c, stride=2 ** (i + 2))
                       for i, c in enumerate(widths)}

    def forward(self, x):
        raise NotImplementedError

    def output_shape(self):
        return self.shapes


@pytest.mark.parametrize('backbone', sorted(BACKBONE_WIDTHS))
def test_decoder_params_equal_mmsegs_formula(backbone):
    """UPerHead + aux (512 / 256 channels) and FPN + FPNHead (256 / 128) of the recipes (150
    classes, SyncBN) have mmseg's parameter count for each backbone's widths, within 0.5%
    (exactly, today). Catches: a fourth FPN conv or lateral on the PPM level, a missing
    auxiliary head or norm, conv biases under a norm, a different bottleneck kernel."""
    widths = BACKBONE_WIDTHS[backbone]
    stages = _Stages(widths)
    uper_cfg = _cfg(os.path.join(SEMANTIC_DIR, f'upernet_{backbone}_fpn_160k.yaml'))
    fpn_cfg = _cfg(os.path.join(SEMANTIC_DIR, f'semantic_fpn_{backbone}_fpn_80k.yaml'))
    with torch.device('meta'):  # shapes only: no memory, no init time
        uper = build_sem_seg_head(uper_cfg, stages.output_shape())
        neck = build_fusion_fpn(stages, fpn_cfg)
        fpn_head = build_sem_seg_head(fpn_cfg, neck.output_shape())
    ours = sum(p.numel() for p in uper.parameters())
    assert ours == pytest.approx(mmseg_uper_head_params(widths, 150), rel=0.005)
    ours = sum(p.numel() for p in list(neck.parameters()) + list(fpn_head.parameters()))
    assert ours == pytest.approx(mmseg_semantic_fpn_params(widths, 150), rel=0.005)


def test_backbone_widths_are_the_models():
    """BACKBONE_WIDTHS is what our timm models give detectron2 (built on the meta device)."""
    import timm
    import maformer_zoo
    assert sorted(BACKBONE_WIDTHS) == sorted(maformer_zoo.list_models())
    for name, widths in BACKBONE_WIDTHS.items():
        with torch.device('meta'):
            model = timm.create_model(name, features_only=True, pretrained=False)
        assert tuple(model.feature_info.channels()) == widths, name


class _Segmenter(torch.nn.Module):
    """Backbone + neck + head logits: what the papers' FLOPs count."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.sem_seg_head.layers(self.model.backbone(x))


def _flops_script():
    spec = importlib.util.spec_from_file_location(
        'segmentation_flops', os.path.join(ROOT, 'benchmarks', 'segmentation_flops.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Counted(torch.nn.Module):
    """conv(bias) + BN + ReLU module, detectron2 Conv2d with BN + F.relu, Linear, SDPA, matmul."""

    def __init__(self):
        super().__init__()
        from detectron2.layers import Conv2d
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.d2conv = Conv2d(8, 8, 1, bias=False, norm=torch.nn.BatchNorm2d(8),
                             activation=torch.nn.functional.relu)
        self.linear = torch.nn.Linear(8, 16)

    def forward(self, x):
        x = self.d2conv(self.relu(self.bn(self.conv(x))))
        t = self.linear(x.flatten(2).transpose(1, 2))  # (1, 16, 16)
        attn = torch.nn.functional.scaled_dot_product_attention(t[None], t[None], t[None])
        return attn @ t.transpose(-1, -2)


def test_flop_counters_count_as_fvcore_and_mmcv():
    """mmcv's way: modules only (conv MACs + bias, BN 2 x elements, ReLU elements, detectron2's
    inner ReLU as mmcv's ConvModule module, Linear MACs), nothing for SDPA or matmul; fvcore's way:
    conv / linear MACs plus the attention and matmul products (BN folded in eval: 0 for BN)."""
    script = _flops_script()
    model = _Counted()
    x = torch.zeros(1, 3, 4, 4)
    hw = 16
    conv = hw * 8 * 27 + hw * 8
    bn = 2 * hw * 8
    relu = hw * 8
    d2 = hw * 8 * 8 + bn + relu
    linear = hw * 8 * 16
    mmcv = script.mmcv_style_flops(model, x, prefix='conv')
    assert mmcv['total'] * 1e9 == pytest.approx(conv + bn + relu + d2 + linear)
    assert mmcv['part'] * 1e9 == pytest.approx(conv)
    fv = script.fvcore_flops(model, (4, 4), prefix='linear')
    sdpa = hw * hw * (16 + 16)
    matmul = hw * 16 * hw
    assert fv['part'] * 1e9 == pytest.approx(linear)
    assert fv['total'] * 1e9 == pytest.approx(hw * 8 * 27 + bn // 2 + hw * 8 * 8 + bn // 2 + linear
                                              + sdpa + matmul, rel=0.02)


def test_segmentation_flops_script_on_a_tiny_input(tmp_path):
    """The benchmark runs end to end (tiny input, one backbone, both decoders) and writes rows."""
    script = _flops_script()
    out = tmp_path / 'rows.json'
    assert script.main(['--backbones', FAST_BACKBONE, '--necks', 'fpn', '--size', '64', '64',
                        '--json', str(out)]) == 0
    rows = {r['config']: r for r in json.loads(out.read_text())}
    assert sorted(rows) == [f'semantic_fpn_{FAST_BACKBONE}_fpn_40k.yaml',
                            f'upernet_{FAST_BACKBONE}_fpn_160k.yaml']
    for row in rows.values():
        assert 0 < row['backbone_gflops_mmcv'] < row['gflops_mmcv']
        assert row['decoder_gflops_fvcore'] == pytest.approx(
            row['gflops_fvcore'] - row['backbone_gflops_fvcore'], abs=0.11)


# (config, timm name or None, input (H, W), paper GFLOPs, counter): MSCSA Table 3 (Semantic FPN,
# 512x512; fvcore with attention, docs/segmentation.md) and MAFormer Table 7 (2048x512; mmcv's
# module count, which the paper's numbers match).
PAPER_FLOPS = [
    ('semantic_fpn_pvt_v2_b0_mscsa_fpn_40k.yaml', None, (512, 512), 26, 'fvcore'),
    ('semantic_fpn_pvt_v2_b0_mscsa_fpn_40k.yaml', 'pvt_v2_b0', (512, 512), 25, 'fvcore'),
    ('semantic_fpn_pvt_v2_b1_mscsa_fpn_40k.yaml', None, (512, 512), 36, 'fvcore'),
    ('semantic_fpn_pvt_v2_b1_mscsa_fpn_40k.yaml', 'pvt_v2_b1', (512, 512), 34, 'fvcore'),
    ('semantic_fpn_pvt_v2_b2_mscsa_fpn_40k.yaml', None, (512, 512), 49, 'fvcore'),
    ('semantic_fpn_pvt_v2_b2_mscsa_fpn_40k.yaml', 'pvt_v2_b2', (512, 512), 46, 'fvcore'),
    ('semantic_fpn_maformer_s_fpn_80k.yaml', None, (512, 2048), 170, 'mmcv'),
    ('upernet_maformer_s_fpn_160k.yaml', None, (512, 2048), 929, 'mmcv'),
]


@pytest.mark.parametrize('config,name,size,paper,counter', [
    pytest.param(*row, marks=() if 'b0' in row[0] else pytest.mark.slow) for row in PAPER_FLOPS])
def test_flops_match_the_papers(config, name, size, paper, counter):
    """Within 5% of the papers' FLOPs (docs/segmentation.md lists all measured numbers)."""
    opts = ('MODEL.TIMM.NAME', name) if name else ()
    model = _Segmenter(build_model(_cfg(os.path.join(SEMANTIC_DIR, config), *opts)))
    if counter == 'fvcore':
        from maformer_zoo.utils.flops import count_flops
        flops = count_flops(model, size)
    else:
        flops = _flops_script().mmcv_style_flops(model, torch.zeros(1, 3, *size))['total']
    assert flops == pytest.approx(paper, rel=0.05)


def test_semantic_fpn_maformer_s_params_match_the_paper():
    """MAFormer Table 7: Semantic FPN with MAFormer-S, 28M parameters (150 classes)."""
    model = build_model(_cfg(os.path.join(SEMANTIC_DIR, 'semantic_fpn_maformer_s_fpn_80k.yaml')))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(28, rel=0.05)
