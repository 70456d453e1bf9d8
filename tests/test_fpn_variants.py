"""detectron2-level tests of FINE-FPN / ASFF-FPN: configs, parameter counts against the FINE paper,
checkpoint compatibility with detectron2's FPN, and short training + inference runs."""
import glob
import math
import os

import pytest
import torch

pytest.importorskip('detectron2')
pytestmark = pytest.mark.detectron2

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.modeling.backbone import FPN  # noqa: E402

import detectron2_ext  # noqa: E402
from detectron2_ext.modeling.fpn_variants import FINE, ASFF, FPNFusions, FusionFPN  # noqa: E402

from conftest import ROOT, load_d2_config, script_env
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'COCO-*', '*_R_50_*_1x.yaml')))
MILLION = 1e6


def _cfg(path, *opts):
    return load_d2_config(path, 'MODEL.WEIGHTS', '', 'MODEL.DEVICE', 'cpu', *opts)


def _config(task, name):
    return os.path.join(ROOT, 'configs', task, name)


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_there_are_twelve_configs():
    names = {os.path.relpath(p, os.path.join(ROOT, 'configs')) for p in CONFIGS}
    expected = {
        f'{task}/{model}_R_50_{neck}_1x.yaml'
        for task, model in [('COCO-Detection', 'faster_rcnn'), ('COCO-Detection', 'retinanet'),
                            ('COCO-InstanceSegmentation', 'mask_rcnn'),
                            ('COCO-PanopticSegmentation', 'panoptic_fpn')]
        for neck in ('fpn', 'fine_fpn', 'asff_fpn')}
    assert names == expected


@pytest.mark.parametrize('path', CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_builds_with_fpn_contract(path):
    cfg = _cfg(path)
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.WEIGHTS == ''  # the file itself points at detectron2's ImageNet R-50
    assert _cfg(path).MODEL.BACKBONE.NAME.startswith('build_')
    backbone = build_backbone(cfg)
    assert isinstance(backbone, FPN)
    fusion = 'fine' if '_fine_' in path else 'asff' if '_asff_' in path else 'sum'
    assert getattr(backbone, 'fusion', 'sum') == fusion
    retina = 'retinanet' in path
    levels = ['p3', 'p4', 'p5', 'p6', 'p7'] if retina else ['p2', 'p3', 'p4', 'p5', 'p6']
    shapes = backbone.output_shape()
    assert list(shapes) == levels
    assert [shapes[k].stride for k in levels] == [2 ** int(k[1]) for k in levels]
    assert all(shapes[k].channels == 256 for k in levels)
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {'size_divisibility': 32, 'square_size': 0}
    n_fine = sum(isinstance(m, FINE) for m in backbone.modules())
    # the paper configs set MODEL.FINE.EXTRA_LEVELS: Eq. 3's fusions (3 on P2-P5, 2 on P3-P5) plus
    # the extra pairs (P5, P6) or (P5, P6), (P6, P7): four on both
    assert cfg.MODEL.FINE.EXTRA_LEVELS == (fusion == 'fine')
    assert n_fine == (4 if fusion == 'fine' else 0)
    assert sum(isinstance(m, ASFF) for m in backbone.modules()) == (fusion == 'asff')


def _fine_params(model, stages):
    return sum(_params(getattr(model.backbone, f'fpn_fine{s}')) for s in stages)


def test_parameter_overhead_against_the_paper():
    """FINE paper Tables 1 and 7: Faster R-CNN 41.8M -> 42.8M, Mask R-CNN 44.4M -> 45.5M,
    RetinaNet 34.0M -> 35.0M, Panoptic FPN 46.0M -> 47.6M. The paper configs (EXTRA_LEVELS) have
    four FINEs, 4 x (4 C^2 + 4 C) = 1.053M at C = 256: three on Eq. 3's fusions + (P5, P6) on the
    R-CNN FPN, two + (P5, P6), (P6, P7) on RetinaNet's."""
    per_fine = 4 * 256 * 256 + 4 * 256
    counts = {}
    for task, model, paper_base, paper_fine, eq3_stages, extra_stages in [
            ('COCO-Detection', 'faster_rcnn', 41.8, 1.0, (2, 3, 4), (5,)),
            ('COCO-InstanceSegmentation', 'mask_rcnn', 44.4, 1.1, (2, 3, 4), (5,)),
            ('COCO-Detection', 'retinanet', None, 1.0, (3, 4), (5, 6)),
            ('COCO-PanopticSegmentation', 'panoptic_fpn', 46.0, 1.6, (2, 3, 4), (5,))]:
        base = _params(build_model(_cfg(_config(task, f'{model}_R_50_fpn_1x.yaml'))))
        fine_model = build_model(_cfg(_config(task, f'{model}_R_50_fine_fpn_1x.yaml')))
        fine = _params(fine_model)
        # detectron2's baselines are the paper's (torchvision / mmdet) models up to rounding and
        # their class-count conventions (torchvision's box predictor has 91 COCO ids, not 80);
        # RetinaNet's is not (P6 from C5, not P5: docs/necks.md)
        if paper_base is not None:
            assert abs(base / MILLION - paper_base) < 0.15, (model, base)
        assert fine - base == 4 * per_fine
        # Eq. 3 alone (EXTRA_LEVELS off) is the fusions' share, the rest is on the extra pairs
        assert _fine_params(fine_model, eq3_stages) == len(eq3_stages) * per_fine
        assert _fine_params(fine_model, extra_stages) == len(extra_stages) * per_fine
        if model != 'panoptic_fpn':  # the goal: within 0.25M of the paper's detection overheads
            assert abs((fine - base) / MILLION - paper_fine) <= 0.25, (model, fine - base)
        if model != 'retinanet':
            counts[model] = (base, fine, _params(build_model(
                _cfg(_config(task, f'{model}_R_50_asff_fpn_1x.yaml')))))
    # the neck is the same in all three R-CNNs, so the overhead is too (see docs/necks.md
    # for the paper's +1.6M on Panoptic FPN)
    assert len({fine - base for base, fine, _ in counts.values()}) == 1
    # ASFF on four levels: 6 down convs 3x3 + 6 up convs 1x1 + 16 weight convs, all 256 channels
    asff_params = 6 * (9 * 256 * 256 + 256) + 6 * (256 * 256 + 256) + 16 * 257
    assert {asff - base for base, _, asff in counts.values()} == {asff_params}


def _tiny_opts(fusion_builder, extra=()):
    """R18, BN (trainable from scratch), small images and few proposals: seconds on a CPU."""
    return [
        'MODEL.BACKBONE.NAME', fusion_builder,
        'MODEL.RESNETS.DEPTH', 18, 'MODEL.RESNETS.RES2_OUT_CHANNELS', 64,
        'MODEL.RESNETS.NORM', 'BN', 'MODEL.RESNETS.STRIDE_IN_1X1', False,
        'MODEL.PIXEL_STD', [57.375, 57.12, 58.395],
        'MODEL.FPN.OUT_CHANNELS', 64,
        'MODEL.RPN.PRE_NMS_TOPK_TRAIN', 200, 'MODEL.RPN.POST_NMS_TOPK_TRAIN', 50,
        'MODEL.RPN.PRE_NMS_TOPK_TEST', 200, 'MODEL.RPN.POST_NMS_TOPK_TEST', 50,
        'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE', 32,
        'MODEL.ROI_BOX_HEAD.FC_DIM', 128, 'MODEL.ROI_MASK_HEAD.CONV_DIM', 64,
        'MODEL.SEM_SEG_HEAD.CONVS_DIM', 32,
        'INPUT.MIN_SIZE_TRAIN', (128,), 'INPUT.MAX_SIZE_TRAIN', 160,
        'INPUT.MIN_SIZE_TEST', 128, 'INPUT.MAX_SIZE_TEST', 160, 'INPUT.MASK_FORMAT', 'bitmask',
        'SOLVER.IMS_PER_BATCH', 2, 'SOLVER.BASE_LR', 0.002,
        'SOLVER.CLIP_GRADIENTS.ENABLED', True, 'DATALOADER.NUM_WORKERS', 0,
        *extra]


def _tiny_backbone(fusion, *extra):
    cfg = _cfg(_config('COCO-InstanceSegmentation', 'mask_rcnn_R_50_fpn_1x.yaml'),
               *_tiny_opts('build_resnet_fusion_fpn_backbone', ['MODEL.FPN.FUSION', fusion, *extra]))
    return build_backbone(cfg)


def test_fpn_checkpoint_loads_and_zero_init_fine_is_the_fpn():
    torch.manual_seed(0)
    fpn = _tiny_backbone('sum').eval()
    fine = _tiny_backbone('fine', 'MODEL.FINE.ZERO_INIT_OUT', True).eval()
    asff = _tiny_backbone('asff').eval()
    for variant, prefix in [(fine, 'fpn_fine'), (asff, 'fpn_asff')]:
        result = variant.load_state_dict(fpn.state_dict(), strict=False)
        assert not result.unexpected_keys
        assert result.missing_keys and all(k.startswith(prefix) for k in result.missing_keys)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        expected, got = fpn(x), fine(x)
        assert list(got) == ['p2', 'p3', 'p4', 'p5', 'p6']
        for name in expected:  # W_O = 0: FINE is the identity (Eq. 9), so outputs are the FPN's
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
        # zero-initialised ASFF weights average the resized levels: not the FPN any more
        out = asff(x)
        assert [tuple(v.shape) for v in out.values()] == [tuple(v.shape) for v in expected.values()]
        assert not torch.allclose(out['p3'], expected['p3'])


def _tiny_retinanet_backbone(*extra):
    cfg = _cfg(_config('COCO-Detection', 'retinanet_R_50_fpn_1x.yaml'),
               *_tiny_opts('build_retinanet_resnet_fusion_fpn_backbone',
                           ['MODEL.FPN.FUSION', 'fine', *extra]))
    return build_backbone(cfg)


@pytest.mark.parametrize('retina', [False, True], ids=['p2-p6', 'p3-p7'])
def test_extra_levels_placement_and_contract(retina):
    """EXTRA_LEVELS: the top block runs on the unmodulated pyramid, then FINE modulates
    P6 <- FINE(P6, P7) (RetinaNet) and P5 <- FINE(P5, P6), top-down; the other levels are the
    Eq.-3 FINE-FPN's. An FPN or Eq.-3 FINE-FPN checkpoint loads with only the new keys missing."""
    build = _tiny_retinanet_backbone if retina else (lambda *o: _tiny_backbone('fine', *o))
    torch.manual_seed(0)
    eq3 = build().eval()
    extra = build('MODEL.FINE.EXTRA_LEVELS', True).eval()
    new_keys = ('fpn_fine5', 'fpn_fine6') if retina else ('fpn_fine5',)
    assert [m.kernel_size for m in extra.top_fusions] == [1] * len(new_keys)
    assert extra.output_shape() == eq3.output_shape()
    result = extra.load_state_dict(eq3.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.split('.')[0] for k in result.missing_keys} == set(new_keys)
    with pytest.raises(ValueError, match='1 top fusions for 0 top-block levels'):
        FusionFPN(eq3.bottom_up, list(eq3.in_features), 64,
                  fusions=lambda: FPNFusions('fine', top=[('fpn_fine5', FINE(64))]))
    plain_fpn = {k: v for k, v in eq3.state_dict().items() if not k.startswith('fpn_fine')}
    result = build('MODEL.FINE.EXTRA_LEVELS', True).load_state_dict(plain_fpn, strict=False)
    assert not result.unexpected_keys and all(k.startswith('fpn_fine') for k in result.missing_keys)

    x = torch.randn(1, 3, 96, 160)  # p6 is 2x3 on RetinaNet: partial AATS windows
    with torch.no_grad():
        want, got = eq3(x), extra(x)
        assert list(got) == list(want) == list(extra.output_shape())
        for name, shape in extra.output_shape().items():
            assert got[name].shape == (1, shape.channels, math.ceil(96 / shape.stride),
                                       math.ceil(160 / shape.stride))
        top, *lower = reversed(list(want))  # coarsest level unchanged, the next ones modulated
        torch.testing.assert_close(got[top], want[top], rtol=0, atol=0)
        context = want[top]
        for name, fine in zip(lower, extra.top_fusions):
            expected = fine(want[name], context)
            torch.testing.assert_close(got[name], expected)
            assert not torch.allclose(got[name], want[name])
            context = expected
        for name in list(want)[:-1 - len(new_keys)]:  # Eq. 3 levels: the same modules, same maps
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    extra(x)['p5'].sum().backward()  # P5 reaches every extra FINE (through its context)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for fine in extra.top_fusions for p in fine.parameters())


def test_config_errors_are_clear():
    path = _config('COCO-Detection', 'faster_rcnn_R_50_fine_fpn_1x.yaml')
    with pytest.raises(ValueError, match='POOL_KERNELS'):
        build_backbone(_cfg(path, 'MODEL.FINE.POOL_KERNELS', [1]))
    with pytest.raises(ValueError, match='fusion must be one of'):
        build_backbone(_cfg(path, 'MODEL.FPN.FUSION', 'concat'))
    plain = get_cfg()  # without add_maformer_zoo_config
    plain.merge_from_list(['MODEL.BACKBONE.NAME', 'build_resnet_fusion_fpn_backbone',
                           'MODEL.RESNETS.OUT_FEATURES', ['res2', 'res3', 'res4', 'res5'],
                           'MODEL.FPN.IN_FEATURES', ['res2', 'res3', 'res4', 'res5']])
    with pytest.raises(KeyError, match='add_maformer_zoo_config'):
        build_backbone(plain)


def test_add_config_is_idempotent_and_fusion_builder_follows_it():
    cfg = _cfg(_config('COCO-Detection', 'faster_rcnn_R_50_fpn_1x.yaml'),
               'MODEL.FINE.HEAD_DIM', 32, 'MODEL.FPN.FUSION', 'fine')
    detectron2_ext.add_maformer_zoo_config(cfg)
    assert cfg.MODEL.FINE.HEAD_DIM == 32 and cfg.MODEL.FPN.FUSION == 'fine'
    backbone = build_backbone(cfg)
    assert isinstance(backbone, FusionFPN) and backbone.fusion == 'fine'
    fines = backbone.lateral_fusions[1:]  # the coarsest lateral has no level above it
    assert [m.num_heads for m in fines] == [8, 8, 8]
    assert [m.kernel_size for m in fines] == [1, 2, 8]  # p4, p3, p2 fusions
    assert fines == [backbone.fpn_fine4, backbone.fpn_fine3, backbone.fpn_fine2]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    from detectron2_ext.data import dataset_num_classes, register_synthetic_dataset
    from detectron2_ext.data import write_synthetic_coco
    root = str(tmp_path_factory.mktemp('synthetic_necks'))
    write_synthetic_coco(root, num_images=4, image_size=(128, 160), seed=3, split='train')
    names = register_synthetic_dataset('necks_synthetic_train', root, 'train')
    counts = dataset_num_classes(names['panoptic'])
    return names, counts


@pytest.mark.parametrize('model', ['mask_rcnn', 'panoptic_fpn'])
@pytest.mark.parametrize('neck', ['fpn', 'fine_fpn', 'asff_fpn'])
def test_two_training_iterations_and_inference(synthetic, model, neck):
    """Two training steps give the neck's own parameters a gradient; inference on the trained
    model always detects (so its checks always run) at the input's size, with a mask per detection.

    Mutation caught (dev/mutations.py): ``fine-neck-output-detached``.
    """
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    names, counts = synthetic
    task = 'COCO-InstanceSegmentation' if model == 'mask_rcnn' else 'COCO-PanopticSegmentation'
    path = _config(task, f'{model}_R_50_{neck}_1x.yaml')
    dataset = names['instances'] if model == 'mask_rcnn' else names['panoptic']
    builder = _cfg(path).MODEL.BACKBONE.NAME
    cfg = _cfg(path, *_tiny_opts(builder, [
        'MODEL.ROI_HEADS.NUM_CLASSES', counts['things'],
        'MODEL.SEM_SEG_HEAD.NUM_CLASSES', counts['stuff'],
        'DATASETS.TRAIN', (dataset,), 'DATASETS.TEST', (dataset,)]))
    torch.manual_seed(0)
    model_ = build_model(cfg)
    optimizer = build_optimizer(cfg, model_)
    new_params = {n: p for n, p in model_.named_parameters() if 'fpn_fine' in n or 'fpn_asff' in n}
    assert bool(new_params) == (neck != 'fpn')

    data = iter(build_detection_train_loader(cfg))
    model_.train()
    with EventStorage():
        for it in range(2):
            losses = model_(next(data))
            total = sum(losses.values())
            assert torch.isfinite(total), losses
            if model == 'panoptic_fpn':
                assert 'loss_sem_seg' in losses and 'loss_mask' in losses
            optimizer.zero_grad()
            total.backward()
            if it == 0:
                # the neck's own parameters get a gradient from the detection losses
                for name, p in new_params.items():
                    assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert any(p.grad.abs().sum() > 0 for p in new_params.values()) or neck == 'fpn'
            optimizer.step()

    model_.eval()
    batch = next(iter(build_detection_test_loader(cfg, dataset)))
    with torch.no_grad():
        outputs = model_(batch)
    assert len(outputs) == len(batch)
    out, inp = outputs[0], batch[0]
    instances = out['instances']
    assert instances.image_size == (inp['height'], inp['width'])
    # the seeded 2-iteration model detects (TEST.DETECTIONS_PER_IMAGE caps it), so every check
    # below runs: finite scores, boxes inside the image, one mask per detection at image size
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert torch.isfinite(instances.scores).all()
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= inp['width']).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= inp['height']).all()
    assert (instances.pred_classes < counts['things']).all()
    if model == 'mask_rcnn':
        assert tuple(instances.pred_masks.shape) == (len(instances), inp['height'], inp['width'])
    else:
        assert out['sem_seg'].shape == (counts['stuff'], inp['height'], inp['width'])
        panoptic, segments = out['panoptic_seg']
        assert panoptic.shape == (inp['height'], inp['width'])


def test_neck_benchmark_writes_json_rows(tmp_path):
    """benchmarks/necks.py --json: a list of flat dicts, one per neck, with ratios to fpn.

    Mutation caught (dev/mutations.py): ``necks-ratio-inverted`` (fpn over the neck).
    """
    import json
    import subprocess
    import sys
    out = tmp_path / 'necks.json'
    cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', 'necks.py'), '--variants', 'asff',
           '--repeats', '1', '--height', '64', '--width', '96', '--skip-memory', '--skip-flops',
           '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r['neck'] for r in rows] == ['fpn', 'asff']
    assert all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    # each ratio is the neck's value over fpn's, from the same rows; ASFF adds parameters
    for key in ('latency_s_model', 'latency_s_neck', 'params_neck'):
        assert rows[1][f'{key}_ratio'] == pytest.approx(rows[1][key] / rows[0][key], rel=1e-9), key
    assert rows[1]['params_neck'] > rows[0]['params_neck']
    assert 'necks: 100%' in proc.stderr  # the progress bar, on stderr
