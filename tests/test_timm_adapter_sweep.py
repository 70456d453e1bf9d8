"""The timm backbone adapter across timm families (docs/detectron2.md, "Families").

For each family, with random weights (``pretrained=False``) and ``MODEL.TIMM.NORM`` FrozenBN:

1. at the model's native size, in eval mode, the adapter's features equal timm's own
   ``features_only`` output for the same weights (BatchNorm statistics and affine randomised, so
   a norm that loses its activation, statistics or affine shows);
2. at 512x768 (non-square, no multiple of any window), padded as detectron2 pads a batch
   (``size_divisibility`` / ``padding_constraints``), it returns the channels and strides
   ``output_shape()`` declares;
3. one SGD step in training mode with ``freeze_at=2`` changes no frozen parameter and no
   BatchNorm statistic, and does train the rest: every parameter outside the stem and the first
   stage is trainable, and each that gets a gradient takes exactly the SGD step.

Mutation caught (dev/mutations.py): ``freeze-one-stage-too-many`` (``freeze_at + 1`` groups).

Every family runs in ``make test``: five in full (``test_family``), the others at the smallest
input (``test_family_small``), with their full form ``slow``.
"""
import math

import pytest
import torch

pytest.importorskip('detectron2')
pytestmark = pytest.mark.detectron2

import timm  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

import maformer_zoo  # noqa: E402,F401  (registers our models)
from detectron2_ext.modeling.timm_backbone import TimmBackbone  # noqa: E402

DETECTION_SIZE = (512, 768)
FAST = {'efficientnet_b0', 'swin_tiny_patch4_window7_224', 'deit_tiny_patch16_224',
        'coat_lite_mini', 'resnet18_mscsa'}
# model name -> extra create_model arguments (MODEL.TIMM.KWARGS)
FAMILIES = {
    # named in issue 12
    'efficientnet_b0': {}, 'mobilenetv3_large_100': {}, 'regnety_016': {}, 'cspresnet50': {},
    'maxvit_pico_rw_256': {}, 'coatnet_pico_rw_224': {}, 'efficientformerv2_s0': {},
    'swin_tiny_patch4_window7_224': {}, 'swinv2_tiny_window8_256': {}, 'coat_lite_mini': {},
    'levit_128': {}, 'vit_small_patch16_224': {}, 'deit_tiny_patch16_224': {}, 'convnext_tiny': {},
    # ours
    'resnet18_mscsa': {}, 'pvt_v2_b0_mscsa': {}, 'maformer_s': {},
    # more of timm
    'resnet18': {}, 'pvt_v2_b0': {}, 'densenet121': {}, 'hrnet_w18_small': {}, 'dla34': {},
    'ese_vovnet19b_dw': {}, 'rexnet_100': {}, 'mobilevit_xxs': {}, 'edgenext_xx_small': {},
    'poolformerv2_s12': {}, 'efficientvit_b0': {}, 'fastvit_t8': {}, 'repvit_m1': {},
    'nf_resnet26': {}, 'ghostnet_100': {}, 'hgnetv2_b0': {}, 'tiny_vit_5m_224': {},
    'focalnet_tiny_srf': {}, 'davit_tiny': {}, 'eva02_tiny_patch14_224': {'patch_size': 16},
    'efficientvit_m0': {}, 'gcvit_xxtiny': {}, 'mvitv2_tiny': {}, 'twins_pcpvt_small': {},
    'xcit_nano_12_p16_224': {}, 'inception_next_tiny': {}, 'dpn68': {}, 'res2net50_14w_8s': {},
    'resnest14d': {},
}


def _randomise_batchnorms(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            if m.affine:
                m.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def _nchw(feature: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    return feature.permute(0, 3, 1, 2) if str(getattr(model, 'output_fmt', 'NCHW')) in (
        'NHWC', 'Format.NHWC') else feature


def _stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if 'running_' in n}


@pytest.mark.parametrize('name', [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in FAMILIES])
def test_family(name):
    extra = FAMILIES[name]
    native = timm.get_pretrained_cfg(name).input_size[-2:]
    backbone = TimmBackbone(name, norm='FrozenBN', freeze_at=2, img_size=max(native),
                            model_kwargs=extra)
    torch.manual_seed(0)  # timm's own features_only model, with the stages the adapter asked for
    reference = timm.create_model(name, features_only=True, pretrained=False, **extra,
                                  out_indices=backbone.model.feature_info.out_indices).eval()
    with torch.no_grad():
        _randomise_batchnorms(reference)
    backbone.model.load_state_dict(reference.state_dict())
    backbone.eval()

    # 1. timm's own features at the native size
    x = torch.randn(1, 3, *native)
    with torch.no_grad():
        want = [_nchw(f, reference) for f in reference(x)]
        got = backbone(x)
    assert list(got) == list(backbone.output_shape())
    for index, (level, feature) in zip(backbone._selected, got.items()):
        expected = want[index]
        scale = expected.abs().max().item() or 1.0
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4 * scale, msg=level)

    # 2. a detection size, padded as detectron2 pads the batch
    detector_backbone = backbone
    if backbone.padding_constraints['square_size']:  # built for its native square: rebuild
        detector_backbone = TimmBackbone(name, norm='FrozenBN', img_size=max(DETECTION_SIZE),
                                         model_kwargs=extra).eval()
    images = ImageList.from_tensors([torch.randn(3, *DETECTION_SIZE)],
                                    detector_backbone.size_divisibility,
                                    padding_constraints=detector_backbone.padding_constraints)
    height, width = images.tensor.shape[-2:]
    assert height >= DETECTION_SIZE[0] and width >= DETECTION_SIZE[1]
    with torch.no_grad():
        out = detector_backbone(images.tensor)
    for level, shape in detector_backbone.output_shape().items():
        assert tuple(out[level].shape) == (1, shape.channels, math.ceil(height / shape.stride),
                                           math.ceil(width / shape.stride)), level

    # 3. one training step: frozen parameters and all BatchNorm statistics stay
    backbone.train()
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen and trainable
    stats = _stats(backbone)
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    loss = sum(f.float().pow(2).mean() for f in backbone(x).values())
    loss.backward()
    optimizer.step()
    after = dict(backbone.named_parameters())
    for n, value in frozen.items():
        assert after[n].grad is None and torch.equal(after[n], value), n
    # "the rest" is every parameter outside the stem and the first stage (freeze_at=2): all of
    # them train, and each one that got a gradient took exactly the SGD step
    groups = backbone._parameter_groups()
    frozen_ids = set().union(*groups[:2])
    rest = {n for n, p in backbone.named_parameters() if id(p) not in frozen_ids}
    assert set(trainable) == rest
    stepped = 0
    for n, value in trainable.items():
        grad = after[n].grad
        if grad is not None and grad.any():
            torch.testing.assert_close(after[n].detach(), value - 0.1 * grad, rtol=0, atol=1e-6, msg=n)
            stepped += 1
    # the first trainable stage's parameters are among those that moved
    assert len(groups) > 2 and any(
        after[n].grad is not None and after[n].grad.any() for n, p in backbone.named_parameters()
        if id(p) in groups[2]), 'the first unfrozen stage did not train'
    assert stepped > 0
    for n, value in _stats(backbone).items():
        assert torch.equal(value, stats[n]), n


def test_every_family_builds_its_declared_pyramid():
    """Every family of the sweep that the fast suite does not run in full builds in the adapter, with FrozenBN and
    freeze_at=2, on the meta device (milliseconds each: nothing allocated), and declares the
    channels and strides of timm's own ``features_only`` model for the levels it returns (stride
    4-32; a single-scale model's one map). The full check per family is ``test_family``; this
    runs every family in the fast suite.
    """
    for name, extra in FAMILIES.items():
        if name in FAST:  # test_family runs these in full
            continue
        native = timm.get_pretrained_cfg(name).input_size[-2:]
        with torch.device('meta'):
            backbone = TimmBackbone(name, norm='FrozenBN', freeze_at=2, img_size=max(native),
                                    model_kwargs=extra)
            # timm's own features_only model, with the levels the adapter asked timm for
            info = timm.create_model(name, features_only=True, pretrained=False, **extra,
                                     out_indices=backbone.model.feature_info.out_indices).feature_info
        channels, reductions = info.channels(), info.reduction()
        shapes = backbone.output_shape()
        assert len(shapes) == len(backbone._selected) > 0, name
        for index, shape in zip(backbone._selected, shapes.values()):
            assert (shape.channels, shape.stride) == (channels[index], reductions[index]), name
        assert any(not p.requires_grad for p in backbone.parameters()), name


def _detector_cfg(name: str, builder: str, fusion: str, mask_on: bool):
    import os
    from detectron2.config import get_cfg
    from detectron2_ext import add_maformer_zoo_config
    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     'configs', 'Base-Timm-RCNN-FPN.yaml'))
    cfg.merge_from_list([
        'MODEL.BACKBONE.NAME', builder, 'MODEL.TIMM.NAME', name, 'MODEL.TIMM.PRETRAINED', False,
        'MODEL.FPN.FUSION', fusion, 'MODEL.MASK_ON', mask_on, 'MODEL.DEVICE', 'cpu',
        'MODEL.ROI_HEADS.NUM_CLASSES', 3, 'MODEL.RPN.POST_NMS_TOPK_TRAIN', 64,
        'MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE', 32, 'MODEL.FPN.OUT_CHANNELS', 64,
        'INPUT.MIN_SIZE_TEST', DETECTION_SIZE[0], 'INPUT.MAX_SIZE_TEST', DETECTION_SIZE[1]])
    return cfg


@pytest.mark.parametrize('name,fusion,mask_on', [
    ('vit_small_patch16_224', 'sum', False),   # Faster R-CNN on a plain ViT
    ('deit_tiny_patch16_224', 'sum', True),    # Mask R-CNN on DeiT
    pytest.param('deit_tiny_patch16_224', 'asff', True, marks=pytest.mark.slow),
])
def test_single_scale_backbones_under_rcnn(name, fusion, mask_on):
    """build_timm_simple_fpn_backbone: ViTDet's pyramid (P2-P6) on a single-scale model; a
    training step and inference at 512x768."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage
    from detectron2_ext.modeling.fpn_variants import ASFF, FusionSimpleFeaturePyramid

    torch.manual_seed(0)
    model = build_model(_detector_cfg(name, 'build_timm_simple_fpn_backbone', fusion, mask_on))
    assert isinstance(model.backbone, FusionSimpleFeaturePyramid)
    assert {k: v.stride for k, v in model.backbone.output_shape().items()} == {
        'p2': 4, 'p3': 8, 'p4': 16, 'p5': 32, 'p6': 64}
    assert [type(m) for m in model.backbone.output_fusions] == ([ASFF] if fusion == 'asff' else [])
    image = torch.randint(0, 255, (3, *DETECTION_SIZE), dtype=torch.uint8)
    instances = Instances(DETECTION_SIZE, gt_boxes=Boxes(torch.tensor([[40., 60., 300., 400.]])),
                          gt_classes=torch.tensor([1]))
    if mask_on:
        masks = torch.zeros(1, *DETECTION_SIZE, dtype=torch.bool)
        masks[:, 60:400, 40:300] = True
        from detectron2.structures import BitMasks
        instances.gt_masks = BitMasks(masks)
    model.train()
    with EventStorage():
        losses = model([{'image': image, 'instances': instances}])
    assert all(torch.isfinite(v) for v in losses.values()) and ('loss_mask' in losses) == mask_on
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{'image': image}])
    assert out[0]['instances'].image_size == DETECTION_SIZE


def test_simple_pyramid_refuses_fine():
    from detectron2.modeling import build_backbone
    cfg = _detector_cfg('deit_tiny_patch16_224', 'build_timm_simple_fpn_backbone', 'fine', False)
    with pytest.raises(ValueError, match='no top-down|does not have'):
        build_backbone(cfg)
    cfg = _detector_cfg('deit_tiny_patch16_224', 'build_timm_fpn_backbone', 'sum', False)
    with pytest.raises(ValueError, match='build_timm_simple_fpn_backbone'):
        build_backbone(cfg)


# ------------------------------------------------------------------ every family, small (fast)

SMALL_SIDE = 64  # the smallest square every family takes: one pixel per stride-64 cell
# families whose stages need a larger input (windows or attention grids of a fixed size)
SMALL_SIDE_OVERRIDE = {}


def _selected_levels(reductions):
    """Indices of timm's features the adapter returns by default: the last map of a single-scale
    model, else the stages at strides 4..32 (docs/detectron2.md#design-choices)."""
    if len(set(reductions)) == 1:
        return [len(reductions) - 1]
    return [i for i, s in enumerate(reductions) if 4 <= s <= 32]


def _built_once(weights_from: torch.nn.Module, name: str, **kwargs) -> TimmBackbone:
    """``TimmBackbone(name, **kwargs)`` with the weights of ``weights_from`` (a model of the same
    architecture), built on the meta device: initialising the weights again would cost as much
    as the rest of the test. Buffers the state dict does not carry (attention index tables) come
    from ``weights_from`` too; a model that still has a meta tensor then is built on the CPU."""
    with torch.device('meta'):
        backbone = TimmBackbone(name, **kwargs)
    state = {k: v.clone() for k, v in weights_from.state_dict().items()}
    backbone.model.load_state_dict(state, assign=True)
    buffers = dict(weights_from.named_buffers())
    for key, buffer in list(backbone.model.named_buffers()):
        if buffer.is_meta and key in buffers:
            owner, _, attr = key.rpartition('.')
            backbone.model.get_submodule(owner)._buffers[attr] = buffers[key].clone()
    if any(t.is_meta for t in backbone.state_dict(keep_vars=True).values()) or any(
            b.is_meta for b in backbone.buffers()):
        backbone = TimmBackbone(name, **kwargs)
        backbone.model.load_state_dict(weights_from.state_dict())
    return backbone


@pytest.mark.parametrize('name', sorted(set(FAMILIES) - FAST))
def test_family_small(name):
    """``test_family``'s three checks for every family the fast suite does not run in full, at the
    smallest input: a ``SMALL_SIDE`` square (fixed-size models are built for it), a non-square
    detection size padded as detectron2 pads a batch, one SGD step with ``freeze_at=2``.

    The reference is timm's own ``features_only`` model as the adapter creates it (``norm='BN'``,
    ``freeze_at=0``: nothing converted or frozen), so both models take the same size arguments and
    the same weights; the checked backbone converts its BatchNorms (FrozenBN), freezes, selects and
    permutes. ``test_family`` (slow for these families) repeats this at the native and 512x768 sizes.

    Mutation caught (dev/mutations.py): ``freeze-one-stage-too-many`` (the first unfrozen stage
    gets no trainable parameter).
    """
    extra = FAMILIES[name]
    side = SMALL_SIDE_OVERRIDE.get(name, SMALL_SIDE)
    torch.manual_seed(0)
    reference = TimmBackbone(name, norm='BN', freeze_at=0, img_size=side, model_kwargs=extra)
    timm_model = reference.model.eval()
    with torch.no_grad():
        _randomise_batchnorms(timm_model)
    backbone = _built_once(timm_model, name, norm='FrozenBN', freeze_at=2, img_size=side,
                           model_kwargs=extra)
    backbone.eval()

    # the declared pyramid is timm's feature_info at the levels returned
    reductions, channels = timm_model.feature_info.reduction(), timm_model.feature_info.channels()
    selected = _selected_levels(reductions)
    assert [(s.channels, s.stride) for s in backbone.output_shape().values()] == [
        (channels[i], reductions[i]) for i in selected]

    # 1. timm's own features, equal
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [_nchw(f, timm_model) for f in timm_model(x)]
        got = backbone(x)
    assert list(got) == list(backbone.output_shape())
    for index, (level, feature) in zip(selected, got.items()):
        expected = want[index]
        scale = expected.abs().max().item() or 1.0
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4 * scale, msg=level)

    # 2. a non-square size, no multiple of anything, padded as detectron2 pads a batch
    square = backbone.padding_constraints['square_size']
    size = (side - 13, side - 27) if square else (side - 13, side + 19)
    images = ImageList.from_tensors([torch.randn(3, *size)], backbone.size_divisibility,
                                    padding_constraints=backbone.padding_constraints)
    height, width = images.tensor.shape[-2:]
    assert (height, width) == ((square, square) if square else tuple(
        -(-s // backbone.size_divisibility) * backbone.size_divisibility for s in size))
    with torch.no_grad():
        out = backbone(images.tensor)
    for level, shape in backbone.output_shape().items():
        assert tuple(out[level].shape) == (1, shape.channels, math.ceil(height / shape.stride),
                                           math.ceil(width / shape.stride)), level

    # 3. one SGD step: frozen parameters and BatchNorm statistics stay, the rest takes the step
    backbone.train()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    stats = _stats(backbone)
    groups = backbone._parameter_groups()
    # the stem and the first stage, and BatchNorms FrozenBN cannot convert (LeViT's 1d ones)
    frozen_ids = set().union(*groups[:2])
    assert frozen_ids
    frozen_ids |= {id(p) for m in backbone.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    assert {n for n, p in backbone.named_parameters() if not p.requires_grad} == {
        n for n, p in backbone.named_parameters() if id(p) in frozen_ids}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    sum(f.float().pow(2).mean() for f in backbone(x).values()).backward()
    optimizer.step()
    moved_first_stage = False
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if id(p) in frozen_ids:
                assert p.grad is None and torch.equal(p, before[n]), n
            elif p.grad is not None and p.grad.any():
                error = (p - (before[n] - 0.1 * p.grad)).abs().max().item()
                scale = 1 + max(before[n].abs().max().item(), p.abs().max().item())
                assert error <= 1e-6 * scale, (n, error)  # round-off of the value
                moved_first_stage |= len(groups) > 2 and id(p) in groups[2]
    assert moved_first_stage, 'the first unfrozen stage did not train'
    for n, value in _stats(backbone).items():
        assert torch.equal(value, stats[n]), n
