"""Deploying detectors (docs/detectron2.md, "Deploying detectors"): FINE / ASFF / FusionFPN /
MSCSA pooling under TorchScript tracing, scripting and ONNX at sizes other than the traced one,
and scripts/export_detector.py on the demo's Mask R-CNN (resnet18_mscsa, every neck) against
eager. The whole-detector tests follow detectron2's own tests/test_export_torchscript.py and
test_export_onnx.py (Mask R-CNN, Cascade, Panoptic FPN, semantic segmentation, RetinaNet) with
our backbones and necks."""
import importlib.util
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('detectron2')
pytestmark = pytest.mark.detectron2

from maformer_zoo.layers.asff import ASFF  # noqa: E402
from maformer_zoo.layers.fine import FINE  # noqa: E402
from maformer_zoo.layers.mscsa import pool_to, pooled_size  # noqa: E402

from conftest import ROOT, script_env
DEMO = os.path.join(ROOT, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')
NECKS = ('sum', 'fine', 'asff')  # MODEL.FPN.FUSION: plain FPN, FINE-FPN, ASFF-FPN
# the sample (128 px short side after the demo's resize) and 5 other sizes: odd, wide, tall,
# larger, and one whose stride-4 map is no multiple of FINE's 16-pixel tokens
OTHER_SIZES = [(96, 142), (160, 224), (200, 96), (131, 77), (224, 288)]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kwargs)


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- FINE and ASFF

def _fine_reference(fine, low, high):
    """Eq. 8-9 written out: nearest upsampling of M_hat by r*k, crop, F_low * (1 + M)."""
    m = F.interpolate(1 + fine.coarse_modulation(low, high), scale_factor=float(fine.low_kernel),
                      mode='nearest')
    return low * m[..., :low.shape[-2], :low.shape[-1]]


def test_fine_trace_serves_other_sizes():
    """A FINE traced at 32x32 (a multiple of its 16-pixel tokens) equals eager at sizes that are
    not multiples, and eager equals Eq. 8-9 written out, bit for bit.
    Mutations caught: branching on ``H % rk == 0`` again (the trace freezes the reshape and fails
    at 40x24); padding at the top/left; dropping the ``1 +`` of the residual."""
    torch.manual_seed(0)
    fine = FINE(32, kernel_size=8, ratio=2).eval()
    traced = _quiet(torch.jit.trace, fine, (torch.randn(1, 32, 32, 32), torch.randn(1, 32, 16, 16)))
    for h, w in [(32, 32), (40, 24), (33, 17), (48, 80)]:
        low, high = torch.randn(2, 32, h, w), torch.randn(2, 32, (h + 1) // 2, (w + 1) // 2)
        eager = fine(low, high)
        torch.testing.assert_close(traced(low, high), eager, rtol=0, atol=0)
        assert torch.equal(eager, _fine_reference(fine, low, high))


@pytest.mark.parametrize('mode', ['nearest', pytest.param('bilinear', marks=pytest.mark.slow)])
def test_fine_and_asff_script(mode):
    """``torch.jit.script`` of FINE and ASFF equals eager at two sizes, and a traced ASFF serves a
    size it was not traced at. Mutations caught: a resizer with another call signature or a
    list comprehension over a ModuleList (script fails); a size-dependent Python branch in the
    pad of odd pyramids (the trace at 64x64 would skip the pad that 33x21 needs)."""
    torch.manual_seed(0)
    fine = FINE(32, kernel_size=2, ratio=2).eval()
    scripted_fine = _quiet(torch.jit.script, fine)
    asff = ASFF([16, 16, 16], upsample_mode=mode).eval()
    for p in asff.parameters():
        torch.nn.init.normal_(p, std=0.2)
    scripted_asff = _quiet(torch.jit.script, asff)

    def pyramid(h, w):
        return [torch.randn(1, 16, -(-h // 2 ** i), -(-w // 2 ** i)) for i in range(3)]
    traced_asff = _quiet(torch.jit.trace, asff, (pyramid(64, 64),))
    for h, w in [(64, 64), (33, 21)]:
        low, high = torch.randn(1, 32, h, w), torch.randn(1, 32, -(-h // 2), -(-w // 2))
        torch.testing.assert_close(scripted_fine(low, high), fine(low, high), rtol=0, atol=0)
        levels = pyramid(h, w)
        levels[1] = levels[1][..., :-1, :]  # an odd pyramid: level 1 one row short
        eager = asff(levels)
        assert _max_diff(scripted_asff(levels), eager) == 0
        assert _max_diff(traced_asff(levels), eager) == 0


# ------------------------------------------------------------------------------ MSCSA pooling

class _Gather(torch.nn.Module):
    def forward(self, x, deepest):
        return pool_to(x, pooled_size(deepest, 32, 32))


def test_mscsa_pooling_exports_to_onnx():
    """MSCSA's pooling of a stride-4 stage to the stride-32 grid, exported to ONNX (opset 11) at
    one size, equals eager ``adaptive_avg_pool2d`` at sizes with exact and uneven windows.
    Mutation caught: calling ``adaptive_avg_pool2d`` under tracing (the export fails: its output
    size is computed in the graph); off-by-one window ends (values differ)."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)

    def inputs(h, w):
        return torch.randn(1, 8, h // 4, w // 4), torch.randn(1, 8, -(-h // 32), -(-w // 32))
    buffer = io.BytesIO()
    _quiet(torch.onnx.export, _Gather(), inputs(256, 320), buffer, dynamo=False, opset_version=11,
           input_names=['x', 'deepest'],
           dynamic_axes={'x': {2: 'h', 3: 'w'}, 'deepest': {2: 'h32', 3: 'w32'}})
    session = ort.InferenceSession(buffer.getvalue(), providers=['CPUExecutionProvider'])
    for h, w in [(256, 320), (128, 544), (100, 70)]:
        x, deepest = inputs(h, w)
        expected = F.adaptive_avg_pool2d(x, pooled_size(deepest, 32, 32)).numpy()
        got = session.run(None, {'x': x.numpy(), 'deepest': deepest.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ FusionFPN scripting

def _fusions(neck, channels):
    """FusionFPN's fusion modules written out (the builder's are tested in test_fpn_variants.py)."""
    from detectron2_ext.modeling.fpn_variants import FPNFusions
    if neck == 'fine':  # one FINE per top-down sum, coarse to fine, and one on (P5, P6)
        return lambda: FPNFusions('fine', lateral=[
            (f'fpn_fine{s}', FINE(channels, kernel_size=k, head_dim=8)) for s, k in ((4, 1), (3, 2), (2, 8))],
            top=[('fpn_fine5', FINE(channels, kernel_size=1, head_dim=8))])
    if neck == 'asff':
        return lambda: FPNFusions('asff', output=[('fpn_asff', ASFF([channels] * 4))])
    return None


@pytest.mark.parametrize('neck', [pytest.param('sum', marks=pytest.mark.slow), 'fine',
                                  pytest.param('asff', marks=pytest.mark.slow)])
def test_fusion_fpn_scripts_on_timm_backbone(neck):
    """FusionFPN on timm's ``resnet18`` (the adapter) scripts as detectron2's FPN does and
    equals eager at two sizes; the scripted copy leaves the eager module's keys alone. Mutations
    caught: indexing ``lateral_convs`` by a loop variable, dropping ``__prepare_scriptable__``
    (the fusions are then deleted or fail to compile), computing the padding properties with
    ``math.lcm`` at call time (uncompilable). Whole detectors on our backbones:
    ``test_scripting_with_instances_on_our_backbones``."""
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool
    from detectron2_ext.modeling.fpn_variants import FusionFPN
    from detectron2_ext.modeling.timm_backbone import TimmBackbone
    torch.manual_seed(0)
    fpn = FusionFPN(TimmBackbone('resnet18', norm='BN'), ['res2', 'res3', 'res4', 'res5'], 32,
                    top_block=LastLevelMaxPool(), fusions=_fusions(neck, 32)).eval()
    keys = sorted(fpn.state_dict())
    scripted = _quiet(torch.jit.script, fpn)
    assert sorted(fpn.state_dict()) == keys
    for h, w in [(64, 96), (160, 64)]:
        x = torch.randn(1, 3, h, w)
        eager, got = fpn(x), scripted(x)
        assert list(got) == list(eager)
        assert _max_diff([got[k] for k in eager], list(eager.values())) == 0


# --------------------------------------------------------------------------- the CLI and API

def _cli():
    spec = importlib.util.spec_from_file_location(
        'export_detector', os.path.join(ROOT, 'scripts', 'export_detector.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_refuses_non_empty_output(tmp_path, capsys):
    """An existing, non-empty --output folder is refused with one line before anything is built
    (no other run's folder is rewritten). Mutation caught: dropping the check (the config
    would be built and the old file overwritten)."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'model.ts').write_bytes(b'old')
    code = _cli().main(['--config-file', DEMO, '--sample-image', str(tmp_path / 'x.png'),
                        '--output', str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'not empty' in err
    assert (out / 'model.ts').read_bytes() == b'old'


def test_cli_refuses_missing_weights(tmp_path, capsys):
    """A --weights path that is no file is refused with one line (detectron2's checkpointer would
    silently start from random weights). Mutation caught: dropping the file check."""
    code = _cli().main(['--config-file', DEMO, '--weights', str(tmp_path / 'none.pth'),
                        '--sample-image', str(tmp_path / 'x.png'), '--output', str(tmp_path / 'o')])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'none.pth' in err


# ------------------------------------------------------------- whole detectors (slow, heavy)

@pytest.fixture(scope='module')
def demo_weights(tmp_path_factory):
    """``weights(*overrides)``: the demo's Mask R-CNN with those config overrides after 0
    iterations with the demo's fixed seed, saved as a detectron2 checkpoint (one per overrides,
    so that every key of the exported and the compared model comes from the file); and a
    sample image. The class logits are scaled by 20 so that the 50 kept detections have
    distinct scores: at random init all scores are within 1e-4 of 1/4, and float rounding would
    reorder ties (a swap of two boxes is no export error)."""
    from PIL import Image
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2_ext.config_file import load_config
    folder = tmp_path_factory.mktemp('demo_export')
    image = (np.random.RandomState(0).rand(150, 200, 3) * 255).astype('uint8')
    Image.fromarray(image).save(folder / 'sample.png')
    saved = {}

    def weights(*overrides):
        if overrides not in saved:
            torch.manual_seed(0)
            model = build_model(load_config(DEMO, list(overrides)))
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.weight.mul_(20)
            name = f'model_{len(saved)}'
            DetectionCheckpointer(model, save_dir=str(folder)).save(name)
            saved[overrides] = str(folder / f'{name}.pth')
        return saved[overrides]
    return weights, str(folder / 'sample.png')


def _export_and_check(tmp_path, demo_weights, fmt, method, neck, *opts):
    """scripts/export_detector.py, then the saved program against eager on the sample and the 5
    other sizes; returns the largest difference."""
    from detectron2_ext.export import load_exported, max_difference
    cli = _cli()
    out = tmp_path / f'{fmt}-{method}-{neck}'
    # every detection kept: the comparison then covers 50 boxes, scores and masks per image
    overrides = ['MODEL.FPN.FUSION', neck, 'MODEL.ROI_HEADS.SCORE_THRESH_TEST', '0.0', *opts]
    weights, sample = demo_weights[0](*overrides), demo_weights[1]
    argv = ['--config-file', DEMO, '--weights', weights, '--format', fmt, '--export-method',
            method, '--sample-image', sample, '--output', str(out), *overrides]
    if method == 'scripting':
        # its own process, as a user runs it: torch.jit.script of a FusionFPN in a process that
        # has already traced or ONNX-exported one failed to compile _NoAlignment (torch's
        # TorchScript type cache; not investigated further)
        env = script_env()
        run = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'export_detector.py'),
                              *argv], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
    else:
        assert _quiet(cli.main, argv) == 0
    cfg, model = cli.build_detector(DEMO, weights, overrides)
    image = cli.load_sample(cfg, sample)
    exported = load_exported(model, image, str(out), fmt, method)
    diffs = [max_difference(exported, x)
             for x in [image] + [cli.resize_sample(image, h, w) for h, w in OTHER_SIZES]]
    assert max(diffs) <= 1e-3, diffs
    return diffs


@pytest.mark.slow
@pytest.mark.parametrize('neck', NECKS)
@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
def test_demo_mask_rcnn_tracing(demo_weights, tmp_path, fmt, neck):
    """The demo's Mask R-CNN (resnet18_mscsa) traced to TorchScript and to ONNX (opset 17) by
    scripts/export_detector.py equals eager within 1e-3 on the sample and 5 other sizes, for
    every neck (detectron2's testMaskRCNNFPN tracing and ONNX tests, our backbone and necks).
    Mutations caught: FINE's ``H % rk`` branch (the trace fails at 131x77), MSCSA's adaptive
    pooling under tracing (the ONNX export fails)."""
    _export_and_check(tmp_path, demo_weights, fmt, 'tracing', neck)


@pytest.mark.slow
@pytest.mark.parametrize('neck', NECKS)
def test_mask_rcnn_scripting(demo_weights, tmp_path, neck):
    """scripts/export_detector.py ``--export-method scripting`` (detectron2's
    ``scripting_with_instances``) on the demo's Mask R-CNN (resnet18_mscsa) equals eager on the
    sample and 5 other sizes, for every neck. Mutation caught: FusionFPN without
    ``__prepare_scriptable__`` (script fails)."""
    _export_and_check(tmp_path, demo_weights, 'torchscript', 'scripting', neck)


# our backbones, made small where scripting and running them would otherwise take long:
# MODEL.TIMM.KWARGS of the demo's Mask R-CNN (resnet18_mscsa is the demo's own)
_OUR_BACKBONES = {
    'resnet18_mscsa': {},
    'maformer_s': {'depths': [1, 1, 1, 1]},
    'swin_tiny_patch4_window7_224_mscsa': {'base_kwargs': {'depths': [1, 1, 1, 1]}},
}
_FAST_SCRIPTING = {('resnet18_mscsa', 'fine')}


def _demo_detector(backbone, neck):
    """The demo's Mask R-CNN with another backbone and neck, seeded, every detection kept, the
    class logits scaled (distinct scores, see ``demo_weights``)."""
    from detectron2.modeling import build_model
    from detectron2_ext.config_file import load_config
    cfg = load_config(DEMO, ['MODEL.TIMM.NAME', backbone, 'MODEL.FPN.FUSION', neck,
                             'MODEL.ROI_HEADS.SCORE_THRESH_TEST', '0.0', 'MODEL.WEIGHTS', ''])
    for key, value in _OUR_BACKBONES[backbone].items():
        cfg.MODEL.TIMM.KWARGS[key] = value
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(20)
    return model


def _instances_difference(want, got, fields):
    """Largest difference over ``fields`` of two lists of Instances (``inf``: other shapes)."""
    worst = 0.0
    for a, b in zip(want, got):
        for field in fields:
            x, y = getattr(a, field), getattr(b, field)
            x, y = getattr(x, 'tensor', x), getattr(y, 'tensor', y)  # Boxes
            if x.shape != y.shape:
                return float('inf')
            if x.numel():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


@pytest.mark.parametrize('backbone,neck', [
    pytest.param(b, n, marks=() if (b, n) in _FAST_SCRIPTING else pytest.mark.slow)
    for b in _OUR_BACKBONES for n in NECKS])
def test_scripting_with_instances_on_our_backbones(backbone, neck):
    """detectron2's own scripting test (tests/test_export_torchscript.py, testMaskRCNNFPN) with our
    backbones and necks: ``scripting_with_instances`` of Mask R-CNN gives eager's boxes, scores,
    classes and masks within 1e-3 on a batch of two images of different sizes
    (50 detections each). Mutation caught: FusionFPN without ``__prepare_scriptable__`` (its
    module lists do not compile)."""
    from detectron2.export import scripting_with_instances
    from detectron2_ext.export import SCRIPTED_FIELDS
    model = _demo_detector(backbone, neck)
    scripted = _quiet(scripting_with_instances, model, SCRIPTED_FIELDS)
    generator = torch.Generator().manual_seed(0)
    inputs = [{'image': torch.rand(3, 128, 160, generator=generator) * 255},
              {'image': torch.rand(3, 96, 200, generator=generator) * 255}]
    with torch.no_grad():
        want = model.inference(inputs, do_postprocess=False)
        got = scripted.inference(inputs, do_postprocess=False)
    assert [len(i) for i in want] == [len(i) for i in got] == [50, 50]
    fields = ['pred_boxes', 'scores', 'pred_classes', 'pred_masks']
    assert _instances_difference(want, got, fields) <= 1e-3


@pytest.mark.slow
def test_retinanet_scripting_on_our_backbone():
    """detectron2's testRetinaNet scripting test with our backbone (resnet18_mscsa) and FINE-FPN:
    the scripted RetinaNet's detections, resized as eager's are, equal eager's within 1e-3 on a
    batch of two images of different sizes. Mutation caught: a neck that does not script."""
    from detectron2.export import scripting_with_instances
    from detectron2.modeling import build_model
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.utils.testing import convert_scripted_instances
    from detectron2_ext.config_file import load_config
    from detectron2_ext.export import SCRIPTED_FIELDS
    cfg = load_config(os.path.join(ROOT, 'configs', _ARCHITECTURES['retinanet']), [
        'MODEL.BACKBONE.NAME', 'build_retinanet_timm_fpn_backbone', 'MODEL.TIMM.NAME',
        'resnet18_mscsa', 'MODEL.TIMM.PRETRAINED', 'False', 'MODEL.WEIGHTS', '',
        'MODEL.FPN.OUT_CHANNELS', '64', 'MODEL.RETINANET.SCORE_THRESH_TEST', '0.0', 'MODEL.DEVICE', 'cpu'])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    scripted = _quiet(scripting_with_instances, model, SCRIPTED_FIELDS)
    generator = torch.Generator().manual_seed(0)
    inputs = [{'image': torch.rand(3, 128, 160, generator=generator) * 255},
              {'image': torch.rand(3, 96, 200, generator=generator) * 255}]
    with torch.no_grad():
        want = [o['instances'] for o in model(inputs)]
        got = [detector_postprocess(convert_scripted_instances(i), *x['image'].shape[1:])
               for i, x in zip(scripted(inputs), inputs)]
    assert all(len(i) > 0 for i in want)
    assert _instances_difference(want, got, ['pred_boxes', 'scores', 'pred_classes']) <= 1e-3


def test_check_exportable_refuses_paths_that_do_not_exist():
    """One-line refusals: scripting to ONNX, scripting a semantic segmentor (only R-CNNs
    script), unknown formats. Mutation caught: dropping a check (the
    export would start and fail deep inside TorchScript)."""
    from detectron2.modeling import GeneralizedRCNN, SemanticSegmentor
    from detectron2_ext.export import check_exportable
    rcnn = object.__new__(GeneralizedRCNN)  # isinstance is all the check reads
    with pytest.raises(ValueError, match='TorchScript only'):
        check_exportable(rcnn, 'onnx', 'scripting')
    with pytest.raises(ValueError, match='tracing for SemanticSegmentor'):
        check_exportable(object.__new__(SemanticSegmentor), 'torchscript', 'scripting')
    with pytest.raises(ValueError, match='choose one of'):
        check_exportable(rcnn, 'caffe2', 'tracing')
    check_exportable(rcnn, 'torchscript', 'scripting')


# detectron2's export tests (testMaskRCNNFPN, testCascadeRCNN, testPanopticFPN, testRetinaNet,
# semantic) with our backbone and FINE-FPN: config of the grid, random init, tracing
_ARCHITECTURES = {
    'cascade': 'COCO-InstanceSegmentation/cascade_mask_rcnn_resnet18_mscsa_fine_fpn_3x.yaml',
    'panoptic': 'COCO-PanopticSegmentation/panoptic_fpn_resnet18_mscsa_fine_fpn_1x.yaml',
    'semantic_fpn': 'ADE20K-SemanticSegmentation/semantic_fpn_resnet18_mscsa_fine_fpn_40k.yaml',
    'upernet': 'ADE20K-SemanticSegmentation/upernet_resnet18_mscsa_fine_fpn_160k.yaml',
    'retinanet': 'COCO-Detection/retinanet_R_50_fine_fpn_1x.yaml',
}


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['torchscript', 'onnx'])
@pytest.mark.parametrize('arch', list(_ARCHITECTURES))
def test_architectures_export(tmp_path, arch, fmt):
    """Every architecture of the grid with FINE-FPN, traced to TorchScript and ONNX (opset 17),
    equals eager at the traced 128x160, at 96x200 and at the larger 224x288 (detectron2 traces at
    half the size it checks) within 1e-3 (detectron2's own R-50 Cascade
    differs by up to 2e-2 at random init; ours by less). UPerNet's pyramid pooling exports through
    ``pool_to`` (mutation: ``F.adaptive_avg_pool2d`` there fails the ONNX case)."""
    from detectron2_ext.export import export_detector, max_difference
    cli = _cli()
    torch.manual_seed(0)
    opts = ['MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '']
    if arch != 'retinanet':
        opts += ['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.TIMM.PRETRAINED_BASE', 'False']
    _, model = cli.build_detector(os.path.join(ROOT, 'configs', _ARCHITECTURES[arch]), '', opts)
    image = torch.rand(3, 128, 160) * 255
    exported = _quiet(export_detector, model, image, str(tmp_path / 'out'), fmt, 'tracing', 17)
    for x in (image, cli.resize_sample(image, 96, 200), cli.resize_sample(image, 224, 288)):
        assert max_difference(exported, x) <= 1e-3
