"""Semantic segmentation: the ADE20K config grid (Semantic FPN, UPerNet), the poly schedule, the
user-data registration and a 2-iteration train_net run on generated data that reports mIoU."""
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
from detectron2.modeling import build_model  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2_ext import add_maformer_zoo_config  # noqa: E402
from detectron2_ext.data import (  # noqa: E402
    register_sem_seg_dataset, set_sem_seg_num_classes, write_synthetic_coco,
    write_synthetic_sem_seg,
)
from detectron2_ext.engine.trainer import build_lr_scheduler  # noqa: E402
from detectron2_ext.modeling.semantic import UPerNetHead  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
SEMANTIC_DIR = os.path.join(CONFIGS, 'ADE20K-SemanticSegmentation')
GRID = sorted(f for f in os.listdir(SEMANTIC_DIR) if f.endswith('.yaml'))
FAST_BACKBONE = 'resnet18_mscsa'


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
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
    fpn80 = _cfg(os.path.join(SEMANTIC_DIR, 'semantic_fpn_maformer_s_fine_fpn_80k.yaml'))
    assert (fpn80.SOLVER.IMS_PER_BATCH, fpn80.SOLVER.BASE_LR, fpn80.SOLVER.WEIGHT_DECAY,
            fpn80.SOLVER.MAX_ITER, fpn80.SOLVER.LR_SCHEDULER_NAME,
            fpn80.SOLVER.WARMUP_ITERS) == (16, 2e-4, 1e-4, 80000, 'WarmupCosineLR', 1000)
    uper = _cfg(os.path.join(SEMANTIC_DIR, 'upernet_maformer_b_asff_fpn_160k.yaml'))
    assert (uper.SOLVER.IMS_PER_BATCH, uper.SOLVER.BASE_LR, uper.SOLVER.WEIGHT_DECAY,
            uper.SOLVER.MAX_ITER, uper.SOLVER.LR_SCHEDULER_NAME, uper.SOLVER.POLY_LR_POWER,
            uper.SOLVER.WARMUP_ITERS) == (16, 6e-5, 0.01, 160000, 'WarmupPolyLR', 1.0, 1500)
    assert uper.MODEL.SEM_SEG_HEAD.NAME == 'UPerNetHead' and uper.MODEL.FPN.FUSION == 'asff'
    assert fpn40.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150
    assert fpn40.DATASETS.TRAIN == ('ade20k_sem_seg_train',)


@pytest.mark.parametrize('config', [
    pytest.param(c, marks=() if FAST_BACKBONE in c and not c.endswith('_80k.yaml')
                 else pytest.mark.slow) for c in GRID])
def test_config_builds_and_segments(config):
    """Every grid config builds (random weights) and predicts NUM_CLASSES maps at the input size."""
    cfg = _cfg(os.path.join(SEMANTIC_DIR, config), 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '7',
               'MODEL.TIMM.NORM', 'BN')
    model = build_model(cfg).eval()
    expected_fusion = config.split('_')[-3] if 'fine' in config or 'asff' in config else 'sum'
    assert model.backbone.fusion == expected_fusion
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        out = model([dict(image=image, height=96, width=128)])
    assert out[0]['sem_seg'].shape == (7, 96, 128)
    assert torch.isfinite(out[0]['sem_seg']).all()


def test_upernet_head_on_backbone_features():
    """Directly on res2..res5 (no FPN neck), 1x1 laterals bring every level to CONVS_DIM."""
    cfg = _cfg(os.path.join(SEMANTIC_DIR, f'upernet_{FAST_BACKBONE}_fpn_160k.yaml'),
               'MODEL.BACKBONE.NAME', 'build_timm_backbone', 'MODEL.SEM_SEG_HEAD.IN_FEATURES',
               '["res2", "res3", "res4", "res5"]', 'MODEL.SEM_SEG_HEAD.CONVS_DIM', '96',
               'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '5', 'MODEL.SEM_SEG_HEAD.NORM', 'BN')
    model = build_model(cfg)
    head = model.sem_seg_head
    assert isinstance(head, UPerNetHead)
    assert all(not isinstance(lat, torch.nn.Identity) for lat in head.laterals)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    sem_seg = torch.randint(0, 5, (64, 64))
    # two images: the PPM's 1x1 pooled branch normalises over the batch
    losses = model([dict(image=image, sem_seg=sem_seg, height=64, width=64)] * 2)
    losses['loss_sem_seg'].backward()
    assert head.ppm.branches[0].weight.grad is not None


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
           'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.MAX_ITER', '2', 'INPUT.CROP.SIZE', '(96,96)',
           'INPUT.MIN_SIZE_TRAIN', '(96,128)', 'INPUT.MIN_SIZE_TEST', '96',
           'DATALOADER.NUM_WORKERS', '0', 'OUTPUT_DIR', output_dir, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


@pytest.mark.parametrize('config', [f'semantic_fpn_{FAST_BACKBONE}_fine_fpn_40k.yaml',
                                    f'semantic_fpn_{FAST_BACKBONE}_asff_fpn_40k.yaml'])
def test_train_net_on_sem_seg_dataset_reports_miou(sem_seg_data, tmp_path, config):
    proc = _train(sem_seg_data, config, str(tmp_path / 'out'), 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '6')
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    match = re.search(r'copypaste: mIoU,fwIoU,mACC,pACC\s*\n.*copypaste: ([\d.]+),([\d.]+),([\d.]+),'
                      r'([\d.]+)', output)
    assert match, output[-3000:]
    miou, fwiou, macc, pacc = (float(v) for v in match.groups())
    assert 0 <= miou <= 100 and 0 < pacc <= 100 and 0 <= fwiou <= 100
    print(f'{config}: mIoU {miou:.2f} fwIoU {fwiou:.2f} pACC {pacc:.2f}')
    assert os.path.isfile(tmp_path / 'out' / 'model_final.pth')


def test_train_net_rejects_labels_outside_the_classes(sem_seg_data, tmp_path):
    proc = _train(sem_seg_data, f'semantic_fpn_{FAST_BACKBONE}_fpn_40k.yaml', str(tmp_path / 'out'),
                  'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '4')
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"error: Dataset 'syn_train': label file '.*' has class [45], but the model has 4 "
                    r"classes", last), proc.stderr[-2000:]
    assert not os.path.isfile(tmp_path / 'out' / 'model_final.pth')


class _Segmenter(torch.nn.Module):
    """Backbone + neck + head logits: what the papers' FLOPs count."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.sem_seg_head.layers(self.model.backbone(x))


# (config, timm name or None, input (H, W), paper GFLOPs): MSCSA Table 3 (Semantic FPN, 512x512)
# and MAFormer Table 7 (UPerNet, 2048x512).
PAPER_FLOPS = [
    ('semantic_fpn_pvt_v2_b0_mscsa_fpn_40k.yaml', None, (512, 512), 26),
    ('semantic_fpn_pvt_v2_b0_mscsa_fpn_40k.yaml', 'pvt_v2_b0', (512, 512), 25),
    ('semantic_fpn_pvt_v2_b1_mscsa_fpn_40k.yaml', None, (512, 512), 36),
    ('semantic_fpn_pvt_v2_b1_mscsa_fpn_40k.yaml', 'pvt_v2_b1', (512, 512), 34),
    ('semantic_fpn_pvt_v2_b2_mscsa_fpn_40k.yaml', None, (512, 512), 49),
    ('semantic_fpn_pvt_v2_b2_mscsa_fpn_40k.yaml', 'pvt_v2_b2', (512, 512), 46),
    ('upernet_maformer_s_fpn_160k.yaml', None, (512, 2048), 929),
]


@pytest.mark.parametrize('config,name,size,paper', [
    pytest.param(*row, marks=() if 'b0' in row[0] else pytest.mark.slow) for row in PAPER_FLOPS])
def test_flops_match_the_papers(config, name, size, paper):
    """Within 5% of the papers' FLOPs (docs/segmentation.md lists all measured numbers)."""
    from maformer_zoo.utils.flops import count_flops
    opts = ('MODEL.TIMM.NAME', name) if name else ()
    model = build_model(_cfg(os.path.join(SEMANTIC_DIR, config), *opts))
    assert count_flops(_Segmenter(model), size) == pytest.approx(paper, rel=0.05)


def test_semantic_fpn_maformer_s_params_match_the_paper():
    """MAFormer Table 7: Semantic FPN with MAFormer-S, 28M parameters (150 classes)."""
    model = build_model(_cfg(os.path.join(SEMANTIC_DIR, 'semantic_fpn_maformer_s_fpn_80k.yaml')))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(28, rel=0.05)
