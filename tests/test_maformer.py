"""MAFormer (issue 4): paper budgets, the timm model API, the MAF pieces, detection sizes, errors."""
import json
import math
import pathlib
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import maformer_zoo  # noqa: F401  (registers the models)
from maformer_zoo.layers.maf import (
    GlobalLearningDownsample, balanced_split, window_self_attention,
)
from maformer_zoo.errors import CheckpointMismatchError, PretrainedWeightsNotFoundError
from maformer_zoo.models.maformer import MafBlock, TransformerBlock
from maformer_zoo.utils import count_flops, count_params

# Table 1: dims, blocks, params (M), GFLOPs at 224x224.
TABLE1 = {
    'maformer_s': ((64, 128, 320, 512), (3, 5, 8, 3), 23, 4.5),
    'maformer_b': ((64, 128, 320, 512), (3, 8, 20, 7), 53, 9.8),
    'maformer_l': ((128, 192, 448, 640), (3, 8, 24, 7), 104, 22.6),
}

# A small MAFormer that still exercises every code path at 64-128 px inputs: two heads per MAF
# stage (one per stripe direction), stripes and GLD reference grid of a 64 px "reference" input
# (16 / 8 tokens), global grids 4 and 2, and stage-3 windows of 3 tokens (so windows, padding and
# shifted windows all occur) with a global stage 4.
TINY = dict(
    embed_dims=(32, 32, 64, 64), depths=(1, 2, 2, 1), head_dim=16, global_grids=(4, 2),
    window_sizes=(3, None), ref_img_size=64, attn_img_size=64, num_classes=10)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('maformer_s', **dict(TINY, **kwargs))


# ---------------------------------------------------------------- paper budgets (Table 1, Table 5)

@pytest.mark.parametrize('name', ['maformer_s', 'maformer_b', 'maformer_l'])
def test_layout_params_and_flops_match_table1(name):
    """Table 1's dims and depths, MAF blocks in stages 1-2, ViT blocks in 3-4, params/FLOPs +-5%."""
    dims, depths, params, gflops = TABLE1[name]
    model = timm.create_model(name)
    assert [len(s.blocks) for s in model.stages] == list(depths)
    assert [f['num_chs'] for f in model.feature_info] == list(dims)
    assert all(isinstance(b, MafBlock) for s in model.stages[:2] for b in s.blocks)
    assert all(isinstance(b, TransformerBlock) for s in model.stages[2:] for b in s.blocks)
    assert all(b.mlp.fc1.out_features == 4 * d for s, d in zip(model.stages, dims) for b in s.blocks)
    measured_params, measured_flops = count_params(model), count_flops(model, (224, 224))
    assert abs(measured_params / params - 1) <= 0.05, (name, measured_params, params)
    assert abs(measured_flops / gflops - 1) <= 0.05, (name, measured_flops, gflops)


def test_backbone_cost_grows_linearly_with_pixels():
    """Table 5 implies a backbone cost about linear in pixels: 800x1280 must cost ~20x 224x224."""
    model = timm.create_model('maformer_s', features_only=True)
    base = count_flops(model, (224, 224))
    det = count_flops(model, (800, 1280))
    ratio = det / base / (800 * 1280 / 224 ** 2)
    assert 0.9 < ratio < 1.1, ratio


# ------------------------------------------------------------------------------ timm model API

# The counters behind Table 1's numbers: test_mscsa.py::test_count_flops_counts_sdpa; registration
# and default cfgs of every model: test_models.py.


# prune_intermediate_layers of every model: test_models.py.


def test_group_matcher_and_no_weight_decay():
    """MAFormer's groups and no-decay set (the contract every model keeps: test_models.py)."""
    model = _tiny()
    nwd = model.no_weight_decay()
    assert nwd
    # stem, four stages, final norm + head
    assert len(timm.models.group_parameters(model, model.group_matcher(coarse=True))) == 6
    from timm.optim import create_optimizer_v2

    optim = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optim.param_groups if g['weight_decay'] == 0 for p in g['params']}
    gld_weights = [p for n, p in model.named_parameters() if n in nwd]
    assert all(id(p) in no_decay for p in gld_weights)
    assert id(model.stages[2].blocks[0].attn.qkv.weight) not in no_decay


def test_stochastic_depth_grows_linearly():
    model = _tiny(drop_path_rate=0.4)
    rates = [getattr(b.drop_path1, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    assert rates[0] == 0
    assert rates == sorted(rates) and math.isclose(rates[-1], 0.4, rel_tol=1e-6)
    assert all(math.isclose(b - a, 0.4 / 5, rel_tol=1e-5) for a, b in zip(rates, rates[1:]))


# ---------------------------------------------------------------------------- training behaviour

# Eval-mode determinism and gradient checkpointing of every model: test_models.py.


# bfloat16 keeps 8 significant bits (unit round-off 2**-8 = 0.4%); through the tiny model the
# relative L2 error against float32 measures 0.6-0.9% (autocast and a bfloat16 model alike), so 3%
# leaves room for other inputs and still fails on a wrong value (a wrong weight or cast is >10%).
BF16_REL_L2 = 0.03


def _rel_l2(a, b):
    return float((a.float() - b).norm() / b.norm())


def test_bf16_matches_float32():
    """bfloat16 autocast and a bfloat16 model give float32's logits and features within
    BF16_REL_L2; the 48x56 input is below the reference size, so the half-precision resize of
    the global mixing weights runs.

    Mutation caught (dev/mutations.py): ``maformer-float32-only`` (a bfloat16 model refuses its
    own dtype). A mutation of the half-precision resize alone (no cast back, nearest instead of
    anti-aliased bilinear) is not caught: its result is cast again or changes the output by less
    than bfloat16's own error on this model (0.91% against 0.78%).
    """
    import copy
    model = _tiny().eval()
    x, y = torch.randn(2, 3, 64, 96), torch.randn(1, 3, 72, 100)
    small = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        ref, ref_feats, ref_small = model(x), model.forward_intermediates(y, intermediates_only=True), model(small)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
            feats = model.forward_intermediates(y, intermediates_only=True)
        pure = copy.deepcopy(model).to(torch.bfloat16)(small.bfloat16())
    assert out.dtype == torch.bfloat16 and pure.dtype == torch.bfloat16
    assert _rel_l2(out, ref) < BF16_REL_L2
    assert _rel_l2(pure, ref_small) < BF16_REL_L2
    assert len(feats) == len(ref_feats) == 4
    for f, r in zip(feats, ref_feats):
        assert f.shape == r.shape and _rel_l2(f, r) < BF16_REL_L2


def test_checkpoint_round_trip_and_errors(tmp_path):
    from safetensors.torch import save_file

    model = _tiny().eval()
    path = tmp_path / 'maformer_tiny.safetensors'
    save_file(model.state_dict(), str(path))
    # num_classes in the overlay: timm drops a classifier whose size differs from the cfg's
    loaded = timm.create_model(
        'maformer_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    # A training checkpoint wrapped under 'model' with DDP prefixes loads through checkpoint_filter_fn.
    wrapped = tmp_path / 'wrapped.pth'
    torch.save({'model': {f'module.{k}': v for k, v in model.state_dict().items()}, 'epoch': 3}, wrapped)
    loaded = timm.create_model(
        'maformer_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(wrapped), num_classes=10),
        **TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    with pytest.raises(CheckpointMismatchError, match="do not fit 'maformer_s'"):
        timm.create_model('maformer_s', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                          **dict(TINY, embed_dims=(32, 32, 64, 128)))
    with pytest.raises(PretrainedWeightsNotFoundError, match='pretrained=False'):
        timm.create_model('maformer_s', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.safetensors')), **TINY)


def test_bad_inputs_fail_clearly():
    model = _tiny().eval()
    with pytest.raises(ValueError, match='in_chans=1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match='4-D batch'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='channels-last'):  # an NHWC batch passed as NCHW
        model(torch.randn(1, 64, 64, 3))
    with pytest.raises(RuntimeError, match='maformer_xl'):
        timm.create_model('maformer_xl')
    with pytest.raises(ValueError, match='even number of heads'):
        timm.create_model('maformer_s', embed_dims=(48, 96, 320, 512))
    # the smallest accepted input works
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 33)).shape == (1, 10)


# ------------------------------------------------------------------------------ detection sizes

@pytest.mark.parametrize('size', [(800, 1216), (608, 1000)])
def test_tiny_features_at_detection_sizes(size):
    """Stripe segments, GLD weight resampling and padded / shifted stage-3 windows at odd sizes."""
    model = _tiny(features_only=True, ref_img_size=224, window_sizes=(14, None)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    expect = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    assert [tuple(o.shape[-2:]) for o in outs] == expect
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['maformer_s', 'maformer_b', 'maformer_l'])
def test_full_models_at_detection_size(name):
    """The same weights run at 224x224 and 800x1216 (resolution-independent GLD)."""
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        small = model(torch.randn(1, 3, 224, 224))
        big = model(torch.randn(1, 3, 800, 1216))
    assert [tuple(o.shape[-2:]) for o in small] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [tuple(o.shape[-2:]) for o in big] == [(200, 304), (100, 152), (50, 76), (25, 38)]
    assert all(torch.isfinite(o).all() for o in big)


# ------------------------------------------------------------------------------ MAF pieces

def _reference_attention(q, k, v):
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


def test_balanced_split():
    assert balanced_split(56, 56) == (1, 56)
    assert balanced_split(200, 56) == (4, 50)
    assert balanced_split(304, 56) == (6, 51)
    assert balanced_split(50, 14) == (4, 13)
    assert balanced_split(7, None) == (1, 7)
    for size in range(1, 80):
        for max_len in range(1, 20):
            n, length = balanced_split(size, max_len)
            assert length <= max_len and n * length >= size and n * length - size < n


def test_window_attention_equals_explicit_windows_with_padding():
    """Windows are cut evenly, padding keys never take part: compare window by window."""
    torch.manual_seed(0)
    B, H, W, heads, d = 2, 7, 10, 2, 8
    qkv = torch.randn(B, H, W, 3, heads, d)
    out = window_self_attention(qkv, (4, 3))  # rows -> 2 windows of 4 (1 padded row); cols -> 4 of 3 (2 padded)
    n_h, wh = balanced_split(H, 4)
    n_w, ww = balanced_split(W, 3)
    for i in range(n_h):
        for j in range(n_w):
            win = qkv[:, i * wh:(i + 1) * wh, j * ww:(j + 1) * ww]
            h, w = win.shape[1:3]
            q, k, v = win.reshape(B, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
            ref = _reference_attention(q, k, v).transpose(1, 2).reshape(B, h, w, heads * d)
            torch.testing.assert_close(out[:, i * wh:(i + 1) * wh, j * ww:(j + 1) * ww], ref)


def test_window_attention_global_when_window_covers_map():
    torch.manual_seed(0)
    qkv = torch.randn(1, 5, 6, 3, 2, 4)
    q, k, v = qkv.reshape(1, 30, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = _reference_attention(q, k, v).transpose(1, 2).reshape(1, 5, 6, 8)
    torch.testing.assert_close(window_self_attention(qkv, (14, 14), shift=True), ref)
    torch.testing.assert_close(window_self_attention(qkv, (None, None)), ref)


def test_shifted_windows_receptive_field():
    """With 4x4 windows shifted by 2 on an 8x8 map, a token influences exactly its shifted window,
    and tokens wrapped around by the cyclic shift never see each other."""
    torch.manual_seed(0)
    qkv = torch.randn(1, 8, 8, 3, 1, 4)

    def influenced(row, col):
        bumped = qkv.clone()
        bumped[0, row, col, 1:] += 5.0  # change key and value of one token
        diff = (window_self_attention(bumped, (4, 4), shift=True)
                - window_self_attention(qkv, (4, 4), shift=True)).abs().sum(-1)[0]
        return {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}

    assert influenced(3, 3) == {(r, c) for r in range(2, 6) for c in range(2, 6)}
    assert influenced(0, 0) == {(r, c) for r in range(0, 2) for c in range(0, 2)}
    assert influenced(7, 4) == {(r, c) for r in range(6, 8) for c in range(2, 6)}


def test_cross_shaped_stripes_receptive_field():
    """Horizontal heads see their row stripe, vertical heads their column stripe (stripe width 1)."""
    torch.manual_seed(0)
    block = MafBlock(16, 2, stripe_width=1, stripe_len=None, gld_ref_size=(6, 6), global_grid=(2, 2)).eval()
    attn = block.local_attn
    torch.nn.init.zeros_(attn.lepe_h.weight)
    torch.nn.init.zeros_(attn.lepe_v.weight)
    x = torch.randn(1, 6, 6, 16)
    bumped = x.clone()
    bumped[0, 2, 3] += 3.0
    with torch.no_grad():
        diff = (attn(bumped) - attn(x)).abs().sum(-1)[0]
    changed = {(int(r), int(c)) for r, c in (diff > 1e-6).nonzero()}
    assert changed == {(2, c) for c in range(6)} | {(r, 3) for r in range(6)}


def test_gld_is_dense_fc_plus_bilinear_at_reference_size():
    torch.manual_seed(0)
    gld = GlobalLearningDownsample((8, 8), (2, 2))
    x = torch.randn(2, 8, 8, 5)
    expected = torch.einsum('ml,blc->bmc', gld.token_mix.weight, x.reshape(2, 64, 5))
    expected = expected + F.interpolate(
        x.permute(0, 3, 1, 2), size=(2, 2), mode='bilinear', antialias=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(gld(x), expected)


def test_gld_weights_follow_the_resolution():
    """The same weights run at any size; each global token keeps its total weight and region."""
    torch.manual_seed(0)
    gld = GlobalLearningDownsample((8, 8), (2, 2))
    with torch.no_grad():
        # token m looks at quadrant m of the image
        weight = torch.zeros(4, 8, 8)
        for m in range(4):
            weight[m, 4 * (m // 2):4 * (m // 2) + 4, 4 * (m % 2):4 * (m % 2) + 4] = 1 / 16
        gld.token_mix.weight.copy_(weight.reshape(4, 64))
        for size in [(8, 8), (32, 48), (5, 7)]:
            w = gld.mixing_weight(size)
            assert w.shape == (4, size[0] * size[1])
            torch.testing.assert_close(w.sum(-1), torch.ones(4), atol=0.03, rtol=0)
            # a constant map gives (constant FC average) + (constant Pos) at every size
            out = gld(torch.full((1, *size, 3), 2.0))
            torch.testing.assert_close(out, torch.full((1, 4, 3), 4.0), atol=0.1, rtol=0)
        # an image bright only in its top-left quadrant lights up global token 0 most
        img = torch.zeros(1, 32, 48, 1)
        img[:, :16, :24] = 1.0
        assert gld(img)[0, :, 0].argmax() == 0


# ------------------------------------------------------------------------------ fidelity fixes

def test_gld_token_mixing_has_no_bias_and_every_weight_acts():
    """A per-global-token bias is the same for all channels and the fusion's LayerNorm removes it
    (it had gradients ~1e-10); GLD's FC has none, and its weights change the block output."""
    block = MafBlock(32, 2, stripe_width=1, stripe_len=8, gld_ref_size=(8, 8), global_grid=(2, 2)).eval()
    assert block.global_branch.token_mix.bias is None
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    block = block.double()
    block(x).square().sum().backward()
    grad = block.global_branch.token_mix.weight.grad
    assert grad.abs().min() > 1e-9 * grad.abs().max() > 0


def _attention_reach(attn, size, src, dst):
    """Does the attention output at token ``dst`` depend on the input at token ``src``?"""
    x = torch.randn(1, *size, attn.qkv.in_features, requires_grad=True)
    attn(x)[0, dst[0], dst[1]].sum().backward()
    return bool(x.grad[0, src[0], src[1]].abs().sum() > 0)


@pytest.mark.parametrize('img', [224, 232, 320, 384])
def test_full_attention_at_classification_sizes_up_to_384(img):
    """Sec. 3.1: full-length stripes in stages 1-2 and global attention in stages 3-4 up to 384x384."""
    model = timm.create_model('maformer_s', depths=(1, 1, 2, 1))
    side = [math.ceil(img / s) for s in (4, 8, 16)]
    for stage, n in zip(model.stages[:2], side[:2]):
        local = stage.blocks[0].local_attn
        assert _attention_reach(local, (n, n), (0, n - 1), (0, 0))  # a whole row
        assert _attention_reach(local, (n, n), (n - 1, 0), (0, 0))  # a whole column
    n = side[2]
    for block in model.stages[2].blocks:  # plain and shifted block
        assert _attention_reach(block.attn, (n, n), (0, 0), (n - 1, n - 1))


def test_windows_bound_the_cost_at_detection_sizes():
    """At 800x1216 stage-3 attention is windowed (24x24 at most) and stripes are cut (96 / 48)."""
    model = timm.create_model('maformer_s', depths=(1, 1, 1, 1))
    assert not _attention_reach(model.stages[2].blocks[0].attn, (50, 76), (0, 0), (49, 75))
    assert _attention_reach(model.stages[2].blocks[0].attn, (50, 76), (0, 0), (16, 18))
    local = model.stages[0].blocks[0].local_attn
    assert not _attention_reach(local, (8, 304), (0, 0), (0, 303))


def test_benchmark_script_runs_every_speed_table(tmp_path):
    """benchmarks/maformer.py end to end, one image per table: the 224 throughput and the detection-size
    features_only table (timm's Swin-T baseline built for any size), as --json rows.

    Mutation caught (dev/mutations.py): ``bench-ratio-inverted`` (baseline over model).
    """
    script = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'maformer.py'
    out = tmp_path / 'maformer.json'
    subprocess.run(
        [sys.executable, str(script), '--models', 'maformer_s', '--skip-flops', '--skip-memory',
         '--batch-size', '1', '--det-size', '96', '160', '--iters', '1',
         '--warmup', '0', '--threads', '1', '--json', str(out)], check=True, capture_output=True)
    rows = {r['model']: r for r in json.loads(out.read_text())}
    assert set(rows) == {'maformer_s', 'swin_tiny_patch4_window7_224'}
    for row in rows.values():
        assert row['images_per_s'] > 0 and row['det_images_per_s'] > 0
    # each ratio is the model's speed over the baseline's, from the same rows
    base = rows['swin_tiny_patch4_window7_224']
    mine = rows['maformer_s']
    assert mine['det_ratio_to_swin_tiny_patch4_window7_224'] == pytest.approx(
        mine['det_images_per_s'] / base['det_images_per_s'], rel=1e-9)
    assert mine['ratio_to_swin_tiny_patch4_window7_224'] == pytest.approx(
        mine['images_per_s'] / base['images_per_s'], rel=1e-9)
