"""Module-level tests of FINE and ASFF (plain PyTorch, no detectron2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from maformer_zoo.layers.asff import ASFF
from maformer_zoo.layers.fine import FINE


def _reference_fine(fine: FINE, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Eq. 4-9 written out with explicit softmax and per-pixel loops over the rk x rk regions."""
    B, C, H, W = low.shape
    rk, k = fine.ratio * fine.kernel_size, fine.kernel_size
    h, w = math.ceil(H / rk), math.ceil(W / rk)
    low_tok = torch.stack([torch.stack([
        low[:, :, i * rk:(i + 1) * rk, j * rk:(j + 1) * rk].mean((-2, -1))
        for j in range(w)], -1) for i in range(h)], -2)
    hh, hw = math.ceil(high.shape[-2] / k), math.ceil(high.shape[-1] / k)
    high_tok = torch.stack([torch.stack([
        high[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean((-2, -1))
        for j in range(hw)], -1) for i in range(hh)], -2)
    q = fine.q(low_tok.flatten(2).transpose(1, 2))
    kv = fine.kv(high_tok.flatten(2).transpose(1, 2))
    key, value = kv[..., :C], kv[..., C:]
    d = fine.head_dim
    heads = []
    for i in range(fine.num_heads):
        sl = slice(i * d, (i + 1) * d)
        attn = (q[..., sl] @ key[..., sl].transpose(1, 2) / math.sqrt(d)).softmax(-1)
        heads.append(attn @ value[..., sl])
    m_hat = fine.proj(torch.cat(heads, -1)).transpose(1, 2).reshape(B, C, h, w)
    m = m_hat.repeat_interleave(rk, -2).repeat_interleave(rk, -1)[..., :H, :W]
    return low * m + low


@pytest.mark.parametrize('size, kernel', [((13, 21), 1), ((15, 9), 2), ((7, 5), 4), ((16, 24), 2)])
def test_fine_matches_equations_at_odd_sizes(size, kernel):
    torch.manual_seed(0)
    fine = FINE(32, kernel_size=kernel, head_dim=16)
    H, W = size
    low = torch.randn(2, 32, H, W)
    high = torch.randn(2, 32, math.ceil(H / 2), math.ceil(W / 2))
    out = fine(low, high)
    assert out.shape == low.shape
    torch.testing.assert_close(out, _reference_fine(fine, low, high), rtol=1e-4, atol=1e-5)
    # with random init the modulation is not trivially zero
    assert (out - low).abs().max() > 1e-4


def test_fine_token_counts_follow_aats():
    fine = FINE(64, kernel_size=2, ratio=2)
    low, high = torch.randn(1, 64, 40, 56), torch.randn(1, 64, 20, 28)
    seen = {}
    fine.q.register_forward_hook(lambda m, i, o: seen.update(q=i[0].shape[1]))
    fine.kv.register_forward_hook(lambda m, i, o: seen.update(kv=i[0].shape[1]))
    fine(low, high)
    # N_low = H W / (r k)^2, N_high = H' W' / k^2 (Sec. 4.3)
    assert seen == {'q': 40 * 56 // 16, 'kv': 20 * 28 // 4}
    assert fine.num_heads == 64 // 16


def test_fine_zero_init_out_is_exact_identity():
    fine = FINE(48, kernel_size=1, zero_init_out=True)
    low, high = torch.randn(2, 48, 11, 17), torch.randn(2, 48, 6, 9)
    assert torch.equal(fine(low, high), low)


def test_fine_channel_projection_appendix_c():
    fine = FINE(32, high_channels=96, kernel_size=2)
    low, high = torch.randn(1, 32, 19, 23), torch.randn(1, 96, 10, 12)
    assert fine(low, high).shape == low.shape
    assert fine.high_proj.weight.shape == (32, 96, 1, 1)


def test_fine_parameter_count_is_four_projections():
    C = 256
    fine = FINE(C)
    assert sum(p.numel() for p in fine.parameters()) == 4 * C * C + 4 * C
    assert fine.num_heads == 16
    assert sum(p.numel() for p in FINE(C, qkv_bias=False).parameters()) == 4 * C * C


def test_fine_gradients_reach_all_parameters():
    torch.manual_seed(0)
    fine = FINE(32, high_channels=64, kernel_size=2)
    low = torch.randn(2, 32, 9, 13, requires_grad=True)
    high = torch.randn(2, 64, 5, 7, requires_grad=True)
    fine(low, high).square().sum().backward()
    for name, p in fine.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert high.grad.abs().sum() > 0 and low.grad.abs().sum() > 0


def test_fine_dense_vanilla_and_max_pool_variants():
    low, high = torch.randn(1, 32, 9, 10), torch.randn(1, 32, 5, 5)
    assert FINE(32, kernel_size=1, ratio=1)(low, high).shape == low.shape
    assert FINE(32, kernel_size=2, pool_type='max')(low, high).shape == low.shape


def test_fine_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match='multiple of head_dim'):
        FINE(40, head_dim=16)
    with pytest.raises(ValueError, match='pool_type'):
        FINE(32, pool_type='median')
    with pytest.raises(ValueError, match='low-level channels'):
        FINE(32)(torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match='same batch size'):
        FINE(32)(torch.randn(2, 32, 8, 8), torch.randn(1, 32, 4, 4))


def _pyramid(sizes, channels, batch=2):
    return [torch.randn(batch, c, h, w) for (h, w), c in zip(sizes, channels)]


@pytest.mark.parametrize('sizes', [
    [(32, 40), (16, 20), (8, 10), (4, 5)],
    [(25, 33), (13, 17), (7, 9), (4, 5)],  # odd sizes: ceil halvings as a stride-2 backbone gives
    [(9, 14), (5, 7), (3, 4)],
])
def test_asff_shapes_any_number_of_levels(sizes):
    channels = [16] * len(sizes)
    asff = ASFF(channels)
    feats = _pyramid(sizes, channels)
    out = asff(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]


def test_asff_weights_sum_to_one_per_pixel():
    torch.manual_seed(0)
    asff = ASFF([8, 8, 8, 8])
    for level in asff.levels:  # leave the zero init so the weights differ per pixel
        for conv in level.weight_convs:
            torch.nn.init.normal_(conv.weight)
    feats = _pyramid([(16, 24), (8, 12), (4, 6), (2, 3)], [8] * 4)
    for level in asff.levels:
        weights = level.fusion_weights(level.resize(feats))
        assert weights.shape[1] == 4
        torch.testing.assert_close(weights.sum(1), torch.ones_like(weights[:, 0]))
        assert weights.min() >= 0
        assert weights.std(dim=(2, 3)).max() > 1e-3  # spatially varying, not a global scalar


def test_asff_output_is_weighted_sum_of_resized_levels():
    torch.manual_seed(0)
    asff = ASFF([8, 8, 8])
    feats = _pyramid([(12, 12), (6, 6), (3, 3)], [8] * 3)
    # zero-initialised weight convs: every source weighs 1/3 everywhere
    level = asff.levels[1]
    resized = level.resize(feats)
    torch.testing.assert_close(asff(feats)[1], sum(resized) / 3)
    assert torch.equal(resized[1], feats[1])
    # the 1/4 path is max pooling then the single stride-2 conv (ASFF Sec. 3.2)
    down = asff.levels[2].resizers[0]
    torch.testing.assert_close(resized_2 := asff.levels[2].resize(feats)[0],
                               down.conv(F.max_pool2d(feats[0], 2)))
    assert resized_2.shape[-2:] == (3, 3)


def test_asff_mixed_channels_and_gradients():
    asff = ASFF([8, 16, 32], norm_layer=torch.nn.BatchNorm2d, act_layer=torch.nn.ReLU)
    for level in asff.levels:
        for conv in level.weight_convs:
            torch.nn.init.normal_(conv.weight)
    feats = _pyramid([(16, 16), (8, 8), (4, 4)], [8, 16, 32])
    out = asff(feats)
    assert [o.shape[1] for o in out] == [8, 16, 32]
    sum(o.square().sum() for o in out).backward()
    for name, p in asff.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_asff_bad_input():
    with pytest.raises(ValueError, match='at least two'):
        ASFF([8])
    with pytest.raises(ValueError, match='levels'):
        ASFF([8, 8])([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match='channels'):
        ASFF([8, 8])([torch.randn(1, 8, 4, 4), torch.randn(1, 4, 2, 2)])
