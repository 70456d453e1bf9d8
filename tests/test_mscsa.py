"""Tests of the MSCSA module (maformer_zoo.layers.mscsa) and the *_mscsa timm models.

Numbers checked against the paper (arXiv:2308.05872): Table 6 total FLOPs, Table 1 component
FLOPs, Table 7 configurations, Eq. 3 down-sampled sizes. Small inputs keep the suite fast; the
detection-size runs of every family are marked ``slow``.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import timm
import maformer_zoo
from maformer_zoo.layers.mscsa import (
    ConvFFN, CrossScaleAttention, DenseFusion, InjectionFusion, IntraFFN, MultiStageCrossScaleAttention,
    MultiStageGather, squeezed_channels)
from maformer_zoo.errors import CheckpointMismatchError, PretrainedWeightsNotFoundError
from maformer_zoo.models.mscsa import MscsaNet
from maformer_zoo.utils import count_flops, count_params
from maformer_zoo.utils.flops import sdpa_flop_jit

MODEL_NAMES = [
    'resnet18_mscsa', 'resnet50_mscsa', 'pvt_v2_b0_mscsa', 'pvt_v2_b1_mscsa', 'pvt_v2_b2_mscsa',
    'swin_tiny_patch4_window7_224_mscsa', 'convnext_tiny_mscsa',
]
# Table 6: total GFLOPs of the augmented models at 224x224
TABLE6_GFLOPS = {
    'resnet50_mscsa': 4.6, 'pvt_v2_b0_mscsa': 0.65, 'pvt_v2_b1_mscsa': 2.3,
    'swin_tiny_patch4_window7_224_mscsa': 5.0, 'convnext_tiny_mscsa': 5.1,
}
BASE_CHANNELS = {
    'resnet18_mscsa': [64, 128, 256, 512], 'resnet50_mscsa': [256, 512, 1024, 2048],
    'pvt_v2_b0_mscsa': [32, 64, 160, 256], 'pvt_v2_b1_mscsa': [64, 128, 320, 512],
    'pvt_v2_b2_mscsa': [64, 128, 320, 512], 'swin_tiny_patch4_window7_224_mscsa': [96, 192, 384, 768],
    'convnext_tiny_mscsa': [96, 192, 384, 768],
}
# Table 7: (squeeze ratio, depth, heads, head dim) -> multi-stage width = sum(round(c * ratio))
TABLE7 = {
    'resnet18_mscsa': (5 / 8, 1, 8, 24), 'resnet50_mscsa': (1 / 4, 1, 8, 32),
    'pvt_v2_b0_mscsa': (3 / 4, 1, 8, 15), 'pvt_v2_b1_mscsa': (5 / 8, 1, 8, 24),
    'pvt_v2_b2_mscsa': (None, 1, 8, 35), 'swin_tiny_patch4_window7_224_mscsa': (3 / 4, 1, 12, 28),
    'convnext_tiny_mscsa': (3 / 4, 1, 12, 28),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (so eval mode is not identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


# --------------------------------------------------------------------------------------------
# The module (maformer_zoo.layers.mscsa)
# --------------------------------------------------------------------------------------------

def _reference_csa(csa: CrossScaleAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1-9 written out token by token, with the module's weights."""
    b, c, h, w = x.shape
    heads, d, dv = csa.num_heads, csa.key_dim, csa.val_dim
    qkv = csa.qkv(x)
    q, k0, v0 = qkv[:, :heads * d], qkv[:, heads * d:2 * heads * d], qkv[:, 2 * heads * d:]
    ks, vs = [k0], [v0]
    for down, kv in zip(csa.down, csa.kv):
        kv_i = kv(down(x))
        ks.append(kv_i[:, :heads * d])
        vs.append(kv_i[:, heads * d:])
    out = torch.zeros(b, heads * dv, h * w)
    for head in range(heads):
        qh = q[:, head * d:(head + 1) * d].flatten(2).transpose(1, 2)  # (B, N, d)
        kh = torch.cat([k[:, head * d:(head + 1) * d].flatten(2) for k in ks], dim=2)  # (B, d, M)
        vh = torch.cat([v[:, head * dv:(head + 1) * dv].flatten(2) for v in vs], dim=2)  # (B, dv, M)
        attn = torch.softmax(qh @ kh / math.sqrt(d), dim=-1)  # Eq. 6
        out[:, head * dv:(head + 1) * dv] = (attn @ vh.transpose(1, 2)).transpose(1, 2)
    out = out.view(b, heads * dv, h, w) + csa.pcp(F.hardswish(v0))  # Eq. 7-9
    return csa.proj[1](F.hardswish(out))


def test_csa_matches_equations():
    csa = CrossScaleAttention(48, num_heads=3, key_dim=8).eval()
    x = torch.randn(2, 48, 7, 10)
    with torch.no_grad():
        assert torch.allclose(csa(x), _reference_csa(csa, x), atol=1e-5)


@pytest.mark.parametrize('h,w', [(7, 7), (7, 10), (1, 1), (25, 38)])
def test_csa_key_value_scales_follow_eq3(h, w):
    csa = CrossScaleAttention(16, num_heads=2, key_dim=4)
    x = torch.randn(1, 16, h, w)
    sizes = [tuple(down(x).shape[-2:]) for down in csa.down]
    assert sizes == [((h - 1) // s + 1, (w - 1) // s + 1) for s in (2, 3)]
    # value heads twice as wide as query/key heads (LeViT, Table 7 caption)
    assert csa.val_dim == 2 * csa.key_dim
    assert csa.qkv.out_channels == 2 * 2 * 4 + 2 * 8


def test_csa_query_chunking_is_exact():
    csa = CrossScaleAttention(32, num_heads=4, key_dim=8).eval()
    x = torch.randn(2, 32, 9, 13)
    with torch.no_grad():
        full = csa(x)
        csa.attn_chunk_elems = 4 * 200  # forces chunks of a few query tokens
        chunked = csa(x)
    assert torch.allclose(full, chunked, atol=1e-5)


def test_intra_ffn_keeps_stages_apart():
    intra = IntraFFN([8, 16, 24], mlp_ratio=2.).eval()
    x = torch.randn(2, 48, 5, 5)
    x2 = x.clone()
    x2[:, 8:24] += 1.0  # perturb stage 1 only
    with torch.no_grad():
        y, y2 = intra(x), intra(x2)
    assert torch.equal(y[:, :8], y2[:, :8]) and torch.equal(y[:, 24:], y2[:, 24:])
    assert not torch.allclose(y[:, 8:24], y2[:, 8:24])
    # a full FFN mixes all stages
    ffn = ConvFFN(48, 96).eval()
    with torch.no_grad():
        assert not torch.allclose(ffn(x)[:, :8], ffn(x2)[:, :8])


def test_gather_pools_to_stride32_and_squeezes():
    gather = MultiStageGather([8, 16, 32, 64], (4, 8, 16, 32), pool_stride=32, squeeze_ratio=0.5)
    feats = [torch.randn(2, c, 100 // s + 1, 150 // s + 1) for c, s in zip([8, 16, 32, 64], [4, 8, 16, 32])]
    out = gather(feats)
    assert out.shape == (2, 4 + 8 + 16 + 32, 4, 5)
    # 1/64 pooling (TopFormer / CoaT dense setting of Table 7) halves the deepest map, rounding up
    gather64 = MultiStageGather([8, 16, 32, 64], (4, 8, 16, 32), pool_stride=64)
    assert gather64(feats).shape == (2, 120, 2, 3)
    with pytest.raises(ValueError, match='squeeze_ratio'):
        squeezed_channels([8], 1.5)


def test_pooling_is_average():
    gather = MultiStageGather([3, 3], (16, 32), pool_stride=32)
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)
    out = gather([a, b])
    assert torch.allclose(out[:, :3], F.avg_pool2d(a, 2)) and torch.equal(out[:, 3:], b)


def test_injection_fusion_is_multiply_add():
    fusion = InjectionFusion(6, 4).eval()
    _randomize_bn(fusion)
    feat, part = torch.randn(2, 4, 8, 12), torch.randn(2, 6, 2, 3)
    with torch.no_grad():
        out = fusion(feat, part)
        # Fig. 5b order: upsample, then weights/biases, sigmoid, multiply-add
        up = F.interpolate(part, size=(8, 12), mode='bilinear', align_corners=False)
        wb = fusion.embed(up)
        expected = feat * wb[:, :4].sigmoid() + wb[:, 4:]
    assert torch.allclose(out, expected, atol=1e-5)
    # the autograd path (out of place) and the in-place path compute the same
    assert torch.allclose(fusion(feat, part), expected, atol=1e-5)
    with torch.no_grad():
        feat_copy = feat.clone()
        assert torch.allclose(fusion(feat_copy, part, inplace=True), expected, atol=1e-5)
        assert torch.allclose(feat_copy, expected, atol=1e-5)  # written into the given feature


def test_injection_fusion_trains_in_fig5b_order():
    """Train mode: BatchNorm sees the upsampled map (Fig. 5b: upsample, then weights and biases).
    The cheaper order (convolve at 1/32, upsample after) would give other batch statistics."""
    import copy
    torch.manual_seed(0)
    fusion = InjectionFusion(6, 4).train()
    reference, low_res = copy.deepcopy(fusion), copy.deepcopy(fusion)
    feat, part = torch.randn(2, 4, 8, 12), torch.randn(2, 6, 2, 3)
    out = fusion(feat, part)
    wb = reference.embed(F.interpolate(part, size=(8, 12), mode='bilinear', align_corners=False))
    torch.testing.assert_close(out, feat * wb[:, :4].sigmoid() + wb[:, 4:])
    bn, bn_ref = fusion.embed[1], reference.embed[1]
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    low_res.embed(part)
    assert not torch.allclose(bn.running_var, low_res.embed[1].running_var, rtol=1e-3)


def test_dense_fusion_splits_per_stage():
    fusion = DenseFusion([2, 3], [4, 5])
    feats = [torch.randn(1, 4, 8, 8), torch.randn(1, 5, 4, 4)]
    outs = fusion(feats, torch.randn(1, 5, 2, 2))
    assert [tuple(o.shape) for o in outs] == [(1, 4, 8, 8), (1, 5, 4, 4)]
    fusion.prune([1])
    assert len(fusion(feats, torch.randn(1, 5, 2, 2), [1])) == 1
    with pytest.raises(RuntimeError, match='pruned'):
        fusion(feats, torch.randn(1, 5, 2, 2), [0])


def test_module_stochastic_depth_and_train_mode():
    mscsa = MultiStageCrossScaleAttention([8, 16], (16, 32), squeeze_ratio=None, depth=2, num_heads=2,
                                          key_dim=4, drop_path_rate=0.2)
    assert [b.drop_path.drop_prob for b in mscsa.blocks] == pytest.approx([0.1, 0.2])
    out = mscsa([torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)])
    assert out.shape == (2, 24, 2, 2)


# --------------------------------------------------------------------------------------------
# Paper numbers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODEL_NAMES)
def test_flops_and_config_match_paper(name):
    model = timm.create_model(name)
    base = timm.create_model(model.pretrained_cfg['architecture'].replace('_mscsa', ''))
    gflops, base_gflops = count_flops(model, (224, 224)), count_flops(base, (224, 224))
    if name in TABLE6_GFLOPS:  # Table 6, +-5 %
        assert gflops == pytest.approx(TABLE6_GFLOPS[name], rel=0.05), gflops
    # "we set the FLOPs cap of MSCSA to be around 10% of the corresponding backbone" (Table 6 caption)
    assert 0.05 < gflops / base_gflops - 1 < 0.15, (gflops, base_gflops)
    ratio, depth, heads, head_dim = TABLE7[name]
    assert model.num_features == sum(squeezed_channels(BASE_CHANNELS[name], ratio))
    assert len(model.mscsa.blocks) == depth
    csa = model.mscsa.blocks[0].attn1
    assert (csa.num_heads, csa.key_dim, csa.val_dim) == (heads, head_dim, 2 * head_dim)


def test_table1_component_flops_pvt_v2_b1():
    """Table 1: CSA 0.049 G, FFN 0.081 G, Intra-FFN 0.030 G in PVTv2-B1+MSCSA at 224x224."""
    from fvcore.nn import FlopCountAnalysis
    model = timm.create_model('pvt_v2_b1_mscsa').eval()
    analysis = FlopCountAnalysis(model, (torch.zeros(1, 3, 224, 224),))
    analysis.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    assert by_module['mscsa.blocks.0.attn1'] / 1e9 == pytest.approx(0.049, rel=0.05)
    assert by_module['mscsa.blocks.0.ffn'] / 1e9 == pytest.approx(0.081, rel=0.05)
    assert by_module['mscsa.blocks.0.intra_ffn'] / 1e9 == pytest.approx(0.030, rel=0.05)


def test_count_flops_counts_sdpa():
    class Attn(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)
    # 2 * 3 * (5 * 5 * (4 + 4)) multiply-adds, nothing else
    assert count_flops(Attn(), (5, 4), in_chans=3, batch_size=2) * 1e9 == pytest.approx(2 * 3 * 5 * 5 * 8)
    assert count_params(nn.Linear(3, 4)) == pytest.approx(16e-6)


# --------------------------------------------------------------------------------------------
# The timm model API
# --------------------------------------------------------------------------------------------

# Registration and default cfgs (no hub id) of every model: test_models.py.

def test_group_matcher_and_no_weight_decay():
    """MSCSA's groups and no-decay set (the contract every model keeps: test_models.py)."""
    from timm.models import group_parameters
    model = timm.create_model('swin_tiny_patch4_window7_224_mscsa')
    groups = group_parameters(model, model.group_matcher(coarse=False))
    group_of = {n: g for g, names in groups.items() for n in names}
    mscsa_groups = {g for n, g in group_of.items() if n.startswith(('mscsa.', 'norm.'))}
    base_groups = {g for n, g in group_of.items() if n.startswith('base.')}
    assert len(mscsa_groups) == 1 and min(mscsa_groups) > max(base_groups)  # after every base stage
    assert group_of['head.fc.weight'] > max(mscsa_groups)  # the head last, as in timm
    assert any(n.startswith('base.patch_embed') for n in groups[min(groups)])
    nwd = model.no_weight_decay()
    assert nwd and all(n.startswith('base.') for n in nwd)


def test_features_only_strides_and_channels():
    model = timm.create_model('pvt_v2_b0_mscsa', features_only=True).eval()
    assert type(model).__name__ == 'FeatureGetterNet'
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 160, 256]
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        outs = model(x)
        base_feats = model.model._base_features(x)
    assert [tuple(o.shape) for o in outs] == [(1, 32, 24, 40), (1, 64, 12, 20), (1, 160, 6, 10), (1, 256, 3, 5)]
    # Fig. 5: the outputs are the base's stage features fused with MSCSA, not the base's own
    assert all(not torch.allclose(o, b) for o, b in zip(outs, base_feats))

    sub = timm.create_model('pvt_v2_b0_mscsa', features_only=True, out_indices=(1, 3))
    assert sub.feature_info.reduction() == [8, 32]
    assert len(sub(torch.randn(1, 3, 64, 64))) == 2
    # unused fusion layers were pruned, so every remaining parameter is used
    assert not any(n.startswith(('model.fusion.layers.0', 'model.fusion.layers.2', 'model.head.fc'))
                   for n, _ in sub.named_parameters())


def test_swin_non_square_detection_size():
    """Swin is built without a fixed image size: 608x1000 (and sizes not divisible by 32) work."""
    model = timm.create_model('swin_tiny_patch4_window7_224_mscsa', features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 608, 1000))
        assert [tuple(o.shape[-2:]) for o in outs] == [(152, 250), (76, 125), (38, 63), (19, 32)]
        odd = model(torch.randn(1, 3, 66, 98))  # padded to 68x100 for the 4x4 patch embedding
        assert [tuple(o.shape[-2:]) for o in odd] == [(17, 25), (9, 13), (5, 7), (3, 4)]


def test_detection_size_pvt_800x1216():
    model = timm.create_model('pvt_v2_b0_mscsa', features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape[-2:]) for o in outs] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('size', [(800, 1216), (608, 1000)])
def test_detection_sizes_all_families(name, size):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [o.shape[1] for o in outs] == BASE_CHANNELS[name]
    assert [o.shape[-2] for o in outs] == pytest.approx([size[0] / s for s in (4, 8, 16, 32)], abs=1)


@pytest.mark.parametrize('name', ['resnet18_mscsa', 'pvt_v2_b0_mscsa', 'convnext_tiny_mscsa',
                                  'swin_tiny_patch4_window7_224_mscsa'])
def test_minimum_input_size(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 31, 64))


# Eval-mode determinism and gradient checkpointing of every model: test_models.py.


def test_in_chans_and_wrong_channels():
    model = timm.create_model('resnet18_mscsa', in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match='1 input channels but got 3'):
        model(torch.randn(1, 3, 64, 64))


def test_unknown_model_name():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('resnet51_mscsa')
    with pytest.raises(RuntimeError, match='Unknown model'):
        MscsaNet('no_such_base')


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    from safetensors.torch import save_file
    model = timm.create_model('pvt_v2_b0_mscsa').eval()
    _randomize_bn(model)
    path = tmp_path / 'pvt_v2_b0_mscsa.safetensors'
    save_file(model.state_dict(), str(path))
    loaded = timm.create_model('pvt_v2_b0_mscsa', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    # a classification checkpoint starts the dense variant: base + MSCSA loaded, fusion layers new
    dense = timm.create_model('pvt_v2_b0_mscsa', features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    for k, v in dense.model.state_dict().items():
        if not k.startswith('fusion.'):
            assert torch.equal(v, sd[k]), k
    # and a torch.save'd training checkpoint ({'state_dict': ...}) loads too
    pth = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': model.state_dict(), 'epoch': 3}, pth)
    loaded_pth = timm.create_model('pvt_v2_b0_mscsa', pretrained=True, pretrained_cfg_overlay=dict(file=str(pth)))
    with torch.no_grad():
        assert torch.equal(model(x), loaded_pth.eval()(x))


def test_checkpoint_mismatch_is_clear(tmp_path):
    from safetensors.torch import save_file
    other = timm.create_model('resnet18_mscsa')
    path = tmp_path / 'resnet18_mscsa.safetensors'
    save_file(other.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match='fit'):
        timm.create_model('pvt_v2_b0_mscsa', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))

    sd = timm.create_model('pvt_v2_b0_mscsa').state_dict()
    sd['mscsa.blocks.0.ffn.fc1.weight'] = torch.zeros(5, 384, 1, 1)
    with pytest.raises(CheckpointMismatchError, match='mscsa.blocks.0.ffn.fc1.weight'):
        timm.create_model('pvt_v2_b0_mscsa', pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))

    base_sd = timm.create_model('pvt_v2_b0').state_dict()
    with pytest.raises(ValueError, match='pretrained_base=True'):
        timm.create_model('pvt_v2_b0_mscsa', pretrained=True, pretrained_cfg_overlay=dict(state_dict=base_sd))

    with pytest.raises(PretrainedWeightsNotFoundError, match='not found'):
        timm.create_model('pvt_v2_b0_mscsa', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.safetensors')))


def test_pretrained_base_loads_base_only(tmp_path):
    from safetensors.torch import save_file
    base = timm.create_model('resnet18')
    _randomize_bn(base)
    path = tmp_path / 'resnet18.safetensors'
    save_file(base.state_dict(), str(path))
    model = timm.create_model('resnet18_mscsa', pretrained_base=True, base_pretrained_cfg_overlay=dict(file=str(path)))
    base_sd = base.state_dict()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    assert not any(k.startswith('fc.') for k in model.base.state_dict())  # base head pruned
    # the MSCSA part is untouched by the base weights: same as a model without pretrained_base
    torch.manual_seed(0)
    ref = timm.create_model('resnet18_mscsa')
    torch.manual_seed(0)
    again = timm.create_model(
        'resnet18_mscsa', pretrained_base=True, base_pretrained_cfg_overlay=dict(state_dict=base_sd))
    for k, v in again.mscsa.state_dict().items():
        assert torch.equal(v, ref.mscsa.state_dict()[k]), k
    for k, v in again.base.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    # with features_only too, and the output of the base features is the base model's
    feats = timm.create_model('resnet18_mscsa', features_only=True, pretrained_base=True,
                              base_pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    base.eval()
    with torch.no_grad():
        assert torch.allclose(feats.model._base_features(x)[3], base.forward_features(x))


def test_pretrained_base_offline_is_clear(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(PretrainedWeightsNotFoundError, match='base_pretrained_cfg_overlay'):
        timm.create_model('resnet18_mscsa', pretrained_base=True, base_kwargs=dict(cache_dir=str(tmp_path)))
