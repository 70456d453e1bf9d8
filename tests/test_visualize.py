"""scripts/visualize.py and detectron2_ext.visualize: the attention the visualiser recomputes is
the modules' own, and the script writes non-blank figures for FINE, ASFF, MAFormer and MSCSA."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip('detectron2')

import maformer_zoo  # noqa: F401,E402
from maformer_zoo.layers.asff import ASFF  # noqa: E402
from maformer_zoo.layers.fine import FINE  # noqa: E402
from maformer_zoo.layers.maf import MultiScaleAttentionFusion  # noqa: E402
from maformer_zoo.layers.mscsa import CrossScaleAttention  # noqa: E402
from detectron2_ext.visualize import (  # noqa: E402
    ASFF_LIMITS, ATTENTION_FLOOR, MODULATION_FLOOR, asff_weights, capture, csa_attention, draw_erf,
    erf_maps, fine_maps, maf_attention, relative_attention, shared_limits, symmetric_limits,
)

from conftest import ROOT
SCRIPT = os.path.join(ROOT, 'scripts', 'visualize.py')
SEMANTIC_DIR = os.path.join(ROOT, 'configs', 'ADE20K-SemanticSegmentation')


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                OMP_NUM_THREADS='1')


def _visualize(*args, timeout=600):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return [line for line in proc.stdout.splitlines() if line.endswith('.png')]


def _assert_not_blank(path):
    """The figure exists and its heatmap panels vary (not one flat colour)."""
    pixels = np.asarray(Image.open(path).convert('RGB')).astype(np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 20, f'{path} looks blank'


@pytest.fixture(scope='module')
def image(tmp_path_factory):
    from detectron2_ext.data.synthetic import render_scene
    path = str(tmp_path_factory.mktemp('vis') / 'scene.png')
    Image.fromarray(render_scene(np.random.default_rng(3), (96, 128))[0]).save(path)
    return path


def _attention_by_sdpa(q, k):
    """The attention matrix F.scaled_dot_product_attention uses: its output with V = identity."""
    eye = torch.eye(k.shape[-2]).expand(*k.shape[:-1], k.shape[-2])
    return F.scaled_dot_product_attention(q, k, eye)


def test_maf_attention_is_the_modules_own():
    torch.manual_seed(0)
    maf = MultiScaleAttentionFusion(64, num_heads=4).eval()
    x_local, x_global = torch.randn(2, 30, 64), torch.randn(2, 9, 64)
    ours = maf_attention(maf, x_local, x_global)
    q = maf.q(x_local[:1]).reshape(1, 30, 4, 16).transpose(1, 2)
    k = maf.kv(x_global[:1]).reshape(1, 9, 2, 4, 16)[:, :, 0].transpose(1, 2)
    assert torch.allclose(ours, _attention_by_sdpa(q, k).mean(1)[0], atol=1e-6)
    # and it reproduces the module's output: proj(attention-weighted values), one head at a time
    weights = (q @ k.transpose(-1, -2) / 4).softmax(-1)
    v = maf.kv(x_global[:1]).reshape(1, 9, 2, 4, 16)[:, :, 1].transpose(1, 2)
    out = maf.proj((weights @ v).transpose(1, 2).reshape(1, 30, 64))
    assert torch.allclose(out, maf(x_local, x_global)[:1], atol=1e-5)
    assert torch.allclose(ours.sum(-1), torch.ones(30), atol=1e-5)


def test_csa_attention_is_the_modules_own():
    torch.manual_seed(0)
    csa = CrossScaleAttention(32, num_heads=2, key_dim=8).eval()
    x = torch.randn(1, 32, 7, 9)
    attention, sizes = csa_attention(csa, x)
    assert sizes == [(7, 9), (4, 5), (3, 3)]
    assert attention.shape == (63, 63 + 20 + 9)
    # the module's output minus its parallel conv path is proj(attention @ V)
    _, _, v0 = csa.qkv(x).split(csa.split_qkv, dim=1)
    values = [v0.reshape(1, 2, 16, -1)]
    for down, kv in zip(csa.down, csa.kv):
        values.append(kv(down(x)).split(csa.split_kv, dim=1)[1].reshape(1, 2, 16, -1))
    v = torch.cat(values, dim=-1).transpose(-1, -2)  # (1, heads, M, 16)
    q, k0, _ = csa.qkv(x).split(csa.split_qkv, dim=1)
    keys = [k0.reshape(1, 2, 8, -1)] + [kv(down(x)).split(csa.split_kv, dim=1)[0].reshape(1, 2, 8, -1)
                                        for down, kv in zip(csa.down, csa.kv)]
    per_head = (q.reshape(1, 2, 8, -1).transpose(-1, -2) @ torch.cat(keys, -1) * csa.scale).softmax(-1)
    assert torch.allclose(per_head.mean(1)[0], attention, atol=1e-6)
    out = (per_head @ v).transpose(-1, -2).reshape(1, -1, 7, 9) + csa.pcp(csa.pcp_act(v0))
    assert torch.allclose(csa.proj(out), csa(x), atol=1e-5)


def test_fine_and_asff_maps_from_hooks():
    torch.manual_seed(0)
    fine, asff = FINE(32, kernel_size=1), ASFF([32, 32, 32])
    for conv in (c for level in asff.levels for c in level.weight_convs):
        torch.nn.init.normal_(conv.weight, std=0.5)
    model = torch.nn.ModuleDict(dict(fine=fine, asff=asff))
    low, high = torch.randn(1, 32, 16, 16), torch.randn(1, 32, 8, 8)
    with capture(model) as found:
        aligned = fine(low, high)
        asff([low, high, torch.randn(1, 32, 4, 4)])
    (_, module, low_in, high_in), = found['fine']
    maps = fine_maps(module, low_in, high_in)
    assert torch.allclose(maps['F_low aligned'], aligned[0])
    assert torch.allclose(maps['F_low aligned'], low[0] * maps['M'] + low[0], atol=1e-6)  # Eq. 9
    assert len(found['asff']) == 3
    weights = asff_weights(found['asff'][1][1], found['asff'][1][2])
    assert weights.shape == (3, 8, 8)
    assert torch.allclose(weights.sum(0), torch.ones(8, 8), atol=1e-6) and weights.std() > 0.01
    # hooks are removed afterwards
    assert not fine._forward_pre_hooks and not asff.levels[0]._forward_pre_hooks


def test_scales_do_not_overstate():
    """Attention spanning [0.0196, 0.0209] around uniform 1/49 (a random-init MAF) is drawn within
    0.06 of the centre of a +-1 scale (nearly flat), while a peaked map widens the scale to its
    value; ASFF weights are always on 0-1; FINE's M on at least +-0.1; panels of one quantity
    share one range. Catches: per-panel min-max stretching, ASFF scaled to its own range."""
    near_uniform = relative_attention(np.linspace(0.0196, 0.0209, 49), 49)
    assert np.abs(near_uniform).max() < 0.06
    assert symmetric_limits([near_uniform], ATTENTION_FLOOR) == (-1.0, 1.0)
    peaked = relative_attention(np.array([0.5] + [0.5 / 48] * 48), 49)
    assert symmetric_limits([near_uniform, peaked], ATTENTION_FLOOR)[1] == pytest.approx(np.log2(24.5))
    assert relative_attention(np.full(10, 0.1), 10) == pytest.approx(np.zeros(10))
    assert ASFF_LIMITS == (0.0, 1.0)
    assert symmetric_limits([np.array([0.001, -0.002])], MODULATION_FLOOR) == (-0.1, 0.1)
    assert shared_limits([np.array([0.0, 2.0]), np.array([-1.0, 1.0])]) == (-1.0, 2.0)


def test_erf_is_local_for_a_convolution(tmp_path):
    """A 3x3 conv's ERF is exactly its 3x3 window around the centre output."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    g, = erf_maps(lambda x: [conv(x)], [torch.randn(1, 3, 9, 9) for _ in range(2)])
    assert (g[3:6, 3:6] > 0).all() and g.sum() == pytest.approx(g[3:6, 3:6].sum())
    paths = draw_erf(lambda x: [conv(x)], [torch.randn(1, 3, 64, 64)],
                     np.zeros((64, 64, 3), np.uint8), str(tmp_path))
    assert os.path.isfile(paths[0])


def test_fine_and_mscsa_figures_from_a_config(image, tmp_path):
    paths = _visualize('--config-file', os.path.join(SEMANTIC_DIR,
                                                     'semantic_fpn_resnet18_mscsa_fine_fpn_40k.yaml'),
                       '--input', image, image, '--output', str(tmp_path), '--size', '128')
    names = [os.path.basename(p) for p in paths]
    assert {'fine_backbone_fpn_fine2.png', 'fine_backbone_fpn_fine3.png',
            'fine_backbone_fpn_fine4.png', 'erf.png'} <= set(names)
    assert any(n.startswith('mscsa_') for n in names)
    for path in paths:
        _assert_not_blank(path)


def test_asff_figure_with_weights(image, tmp_path):
    """Random init gives ASFF's uniform 1/n start; a --weights file with trained-looking weight
    convs gives maps that vary."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2_ext import add_maformer_zoo_config
    config = os.path.join(SEMANTIC_DIR, 'semantic_fpn_resnet18_mscsa_asff_fpn_40k.yaml')
    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list(['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.DEVICE', 'cpu'])
    model = build_model(cfg)
    for name, param in model.named_parameters():
        if 'weight_convs' in name and name.endswith('weight'):
            torch.nn.init.normal_(param, std=0.2)
    weights = str(tmp_path / 'model.pth')
    torch.save({'model': model.state_dict()}, weights)
    paths = _visualize('--config-file', config, '--weights', weights, '--input', image,
                       '--output', str(tmp_path / 'out'), '--size', '128', '--no-erf')
    asff_png = [p for p in paths if p.endswith('asff_weights.png')]
    assert asff_png and 'erf.png' not in [os.path.basename(p) for p in paths]
    _assert_not_blank(asff_png[0])


def test_maformer_figure_of_a_bare_model(image, tmp_path):
    paths = _visualize('--model', 'maformer_s', '--input', image, '--output', str(tmp_path),
                       '--size', '128')
    assert [os.path.basename(p) for p in paths] == ['maf_attention.png', 'erf.png']
    for path in paths:
        _assert_not_blank(path)


def test_bad_weights_fail_in_one_line(image, tmp_path):
    bad = tmp_path / 'model.pkl'
    bad.write_bytes(b'not a pickle')
    proc = subprocess.run([sys.executable, SCRIPT, '--model', 'resnet18_mscsa', '--weights', str(bad),
                           '--input', image, '--output', str(tmp_path)], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('visualize.py: error: --weights')
