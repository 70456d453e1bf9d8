"""Figures of what the fusion modules do (FINE, ASFF, MAF, MSCSA) and each stage's effective
receptive field, drawn with matplotlib from a built detectron2 model or a timm model of ours.

The figures the papers argue with (FINE Fig. 8, ASFF's weight maps, MAF and CSA attention), over
an image, as PNG files. Forward pre-hooks record the modules' inputs and the maps come from the
modules' own methods and weights; what each file shows and its colour scales:
docs/segmentation.md#scriptsvisualizepy. Entry points: :func:`draw_detectron2_model`,
:func:`draw_timm_model`, :func:`draw_all` (any module and one image); ``scripts/visualize.py`` is
the command line, ``scripts/demo.py`` draws the trained demo detector. Here, and not in the model
package, because only these drawing users need matplotlib.
"""
import os
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maformer_zoo.layers.asff import ASFFLevel
from maformer_zoo.layers.fine import FINE
from maformer_zoo.layers.maf import GlobalLearningDownsample, MultiScaleAttentionFusion
from maformer_zoo.layers.mscsa import CrossScaleAttention

__all__ = ['QUERY_POINTS', 'capture', 'draw_all', 'draw_erf', 'draw_timm_model', 'draw_detectron2_model',
           'resize_image', 'fine_maps', 'asff_weights', 'maf_attention', 'csa_attention', 'relative_attention',
           'symmetric_limits', 'shared_limits', 'ASFF_LIMITS', 'ATTENTION_FLOOR', 'MODULATION_FLOOR']

# relative (y, x) positions of the query tokens drawn for MAF and CSA
QUERY_POINTS: Tuple[Tuple[float, float], ...] = ((0.3, 0.25), (0.5, 0.5), (0.75, 0.7))
ASFF_LIMITS = (0.0, 1.0)  # ASFF weights are a softmax over the sources: always this scale
ATTENTION_FLOOR = 1.0     # log2(a * N) is drawn on at least [-1, 1]: half to twice uniform
MODULATION_FLOOR = 0.1    # FINE's M (F_low -> F_low * (1 + M)) on at least [-0.1, 0.1]


# ----------------------------------------------------------------------------------- capturing


@contextmanager
def capture(model: nn.Module):
    """Record the inputs of every FINE, ASFFLevel, MAF fusion (with its GLD's map size) and CSA.

    Yields a dict ``{'fine': [(name, module, low, high)], 'asff': [(name, module, features)],
    'maf': [(name, module, x_local, x_global, (H, W), grid)], 'csa': [(name, module, x)]}``,
    filled by the forward passes run inside the ``with`` block (only the last batch is kept per
    module).
    """
    records: Dict[str, Dict[str, tuple]] = {'fine': {}, 'asff': {}, 'maf': {}, 'csa': {}}
    gld_sizes: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]] = {}
    handles = []

    def hook(kind: str, name: str, module: nn.Module):
        def fn(mod, args):
            detached = tuple(a.detach() if torch.is_tensor(a) else [t.detach() for t in a]
                             for a in args)
            if kind == 'gld':
                x = detached[0]
                gld_sizes[name.rpartition('.')[0]] = (tuple(x.shape[1:3]), tuple(mod.grid_size))
            elif kind == 'maf':
                size, grid = gld_sizes.get(name.rpartition('.')[0], (None, None))
                records['maf'][name] = (name, mod, *detached[:2], size, grid)
            else:
                records[kind][name] = (name, mod, *detached)
        return fn

    for name, module in model.named_modules():
        kind = ('fine' if isinstance(module, FINE) else 'asff' if isinstance(module, ASFFLevel)
                else 'gld' if isinstance(module, GlobalLearningDownsample)
                else 'maf' if isinstance(module, MultiScaleAttentionFusion)
                else 'csa' if isinstance(module, CrossScaleAttention) else None)
        if kind is not None:
            handles.append(module.register_forward_pre_hook(hook(kind, name, module)))
    result: Dict[str, list] = {}
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
        result.update({kind: list(found.values()) for kind, found in records.items()})


# --------------------------------------------------------------------------- what is drawn


@torch.no_grad()
def fine_maps(fine: FINE, low: torch.Tensor, high: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``F_high``, ``F_low``, ``M`` and ``F_low^aligned`` of image 0, each ``(C, h, w)``."""
    return {'F_high': high[0], 'F_low': low[0], 'M': fine.modulation(low, high)[0],
            'F_low aligned': fine(low, high)[0]}


@torch.no_grad()
def asff_weights(level: ASFFLevel, features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-source weights of image 0 at ``level``: ``(num_sources, H, W)``, summing to 1."""
    return level.fusion_weights(level.resize(features))[0]


@torch.no_grad()
def maf_attention(maf: MultiScaleAttentionFusion, x_local: torch.Tensor, x_global: torch.Tensor
                  ) -> torch.Tensor:
    """Softmax attention of image 0's local tokens over the global tokens, mean over heads:
    ``(N_local, N_global)`` (Eq. 3, as ``F.scaled_dot_product_attention`` computes it)."""
    B, N, C = x_local.shape
    heads, head_dim = maf.num_heads, maf.head_dim
    q = maf.q(x_local[:1]).reshape(1, N, heads, head_dim).transpose(1, 2)
    k = maf.kv(x_global[:1]).reshape(1, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)[0]
    return (q @ k.transpose(-1, -2) * head_dim ** -0.5).softmax(-1).mean(1)[0]


@torch.no_grad()
def csa_attention(csa: CrossScaleAttention, x: torch.Tensor
                  ) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Softmax attention of image 0's queries over the keys of all scales (Eq. 5-6), mean over
    heads: ``(h * w, sum of key tokens)``, and the ``(h, w)`` of each key scale in order."""
    x = x[:1]
    q, k0, _ = csa.qkv(x).split(csa.split_qkv, dim=1)
    keys, sizes = [csa._heads(k0, csa.key_dim)], [tuple(x.shape[-2:])]
    for down, kv in zip(csa.down, csa.kv):
        k_i, _ = kv(down(x)).split(csa.split_kv, dim=1)
        keys.append(csa._heads(k_i, csa.key_dim))
        sizes.append(tuple(k_i.shape[-2:]))
    q = csa._heads(q, csa.key_dim).transpose(-1, -2)
    k = torch.cat(keys, dim=-1)
    return (q @ k * csa.scale).softmax(-1).mean(1)[0], sizes


# ------------------------------------------------------------------------------------ drawing


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _channel_mean(x: torch.Tensor) -> np.ndarray:
    return x.float().mean(0).cpu().numpy()


def relative_attention(attention: np.ndarray, num_keys: int) -> np.ndarray:
    """``log2(a * N)``: 0 where the attention is uniform (``1 / N``), +1 at twice uniform."""
    return np.log2(np.maximum(attention * num_keys, 1e-12))


def symmetric_limits(arrays: Sequence[np.ndarray], floor: float) -> Tuple[float, float]:
    """``(-L, L)`` with ``L`` the largest magnitude over ``arrays``, at least ``floor``: a map
    that barely moves from 0 stays near the middle of the scale instead of filling it."""
    top = max(float(np.abs(a).max()) for a in arrays)
    return -max(top, floor), max(top, floor)


def shared_limits(arrays: Sequence[np.ndarray]) -> Tuple[float, float]:
    """One ``(min, max)`` over all ``arrays`` (one scale for panels of one quantity)."""
    return min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)


def _resize(a: np.ndarray, size: Tuple[int, int], mode: str = 'bilinear') -> np.ndarray:
    t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)[None, None]
    kwargs = {} if mode == 'nearest' else dict(align_corners=False)
    return F.interpolate(t, size=size, mode=mode, **kwargs)[0, 0].numpy()


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str, limits: Tuple[float, float],
             mode: str = 'bilinear', cmap: str = 'viridis'):
    ax.imshow(image)
    im = ax.imshow(_resize(heat, image.shape[:2], mode), cmap=cmap, alpha=0.6, vmin=limits[0],
                   vmax=limits[1])
    ax.set_title(title, fontsize=8)
    ax.axis('off')
    return im


def _colorbar(fig, im, axes, label: str) -> None:
    bar = fig.colorbar(im, ax=list(np.ravel(axes)), shrink=0.9, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _figure(rows: int, cols: int, panel: Tuple[float, float] = (2.6, 2.3)):
    return _plt().subplots(rows, cols, figsize=(panel[0] * cols + 1.0, panel[1] * rows + 0.5),
                           squeeze=False, constrained_layout=True)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=72)
    _plt().close(fig)
    return path


def _safe(name: str) -> str:
    return name.replace('.', '_') or 'model'


def _query_index(point: Tuple[float, float], size: Tuple[int, int]) -> Tuple[int, int]:
    return min(int(point[0] * size[0]), size[0] - 1), min(int(point[1] * size[1]), size[1] - 1)


def _mark(ax, point: Tuple[float, float], image: np.ndarray) -> None:
    ax.plot(point[1] * image.shape[1], point[0] * image.shape[0], 'wx', markersize=9, mew=2.5)


def draw_fine(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Per FINE: ``F_high``, ``F_low`` and aligned ``F_low`` (channel means) on one scale, ``M``
    (channel mean; 0 = ``F_low`` unchanged) on a symmetric one."""
    paths = []
    for name, fine, low, high in records:
        maps = {label: _channel_mean(x) for label, x in fine_maps(fine, low, high).items()}
        features = [maps[k] for k in ('F_high', 'F_low', 'F_low aligned')]
        fig, axes = _figure(1, 4)
        order = ('F_high', 'F_low', 'F_low aligned', 'M')
        feature_scale = shared_limits(features)
        m_scale = symmetric_limits([maps['M']], MODULATION_FLOOR)
        for ax, label in zip(axes[0], order):
            if label == 'M':
                m_im = _overlay(ax, image, maps[label], f'M {maps[label].shape}', m_scale,
                                cmap='RdBu_r')
            else:
                im = _overlay(ax, image, maps[label], f'{label} {maps[label].shape}', feature_scale)
        _colorbar(fig, im, axes[0, :3], 'channel mean')
        _colorbar(fig, m_im, axes[0, 3], 'M, channel mean')
        fig.suptitle(f'FINE {name}', fontsize=9)
        paths.append(_save(fig, os.path.join(out_dir, f'fine_{_safe(name)}.png')))
    return paths


def draw_asff(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Rows: output levels; columns: source levels (finest first); weights on a fixed 0-1 scale."""
    if not records:
        return []
    sources = len(records[0][1].weight_convs)
    fig, axes = _figure(len(records), sources)
    for row, (name, level, features) in enumerate(records):
        weights = asff_weights(level, features).cpu().numpy()
        for col in range(sources):
            im = _overlay(axes[row, col], image, weights[col],
                          f'out {level.level} <- in {col} (mean {weights[col].mean():.2f})',
                          ASFF_LIMITS)
    _colorbar(fig, im, axes, 'ASFF weight (sums to 1 over a row)')
    fig.suptitle('ASFF weights: rows output level, columns source level (finest first)', fontsize=9)
    return [_save(fig, os.path.join(out_dir, 'asff_weights.png'))]


def _attention_figure(panels: list, cols: int, image: np.ndarray, bar: str, title: str, path: str) -> str:
    """``panels`` of ``(log2(a * N) map, title, query point)``, ``cols`` per row, on one symmetric
    scale of at least +-1, each with its query point marked."""
    limits = symmetric_limits([p[0] for p in panels], ATTENTION_FLOOR)
    fig, axes = _figure(len(panels) // cols, cols)
    for i, (heat, label, point) in enumerate(panels):
        ax = axes[i // cols, i % cols]
        im = _overlay(ax, image, heat, label, limits, mode='nearest', cmap='RdBu_r')
        _mark(ax, point, image)
    _colorbar(fig, im, axes, bar)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def draw_maf(records: list, image: np.ndarray, out_dir: str,
             points: Sequence[Tuple[float, float]] = QUERY_POINTS) -> List[str]:
    """The last MAF block at each local resolution: attention of each query over the global grid,
    as ``log2(a * N)`` on one scale."""
    last_per_size = {record[4]: record for record in records if record[4] is not None}
    panels = []
    for name, maf, x_local, x_global, size, grid in last_per_size.values():
        attention = maf_attention(maf, x_local, x_global)
        n = attention.shape[-1]
        for col, point in enumerate(points):
            y, x = _query_index(point, size)
            heat = attention[y * size[1] + x].reshape(grid).cpu().numpy()
            panels.append((relative_attention(heat, n), f'local {size[0]}x{size[1]}, q{col + 1}', point))
    if not panels:
        return []
    return [_attention_figure(
        panels, len(points), image, 'log2(attention x N), 0 = uniform',
        'MAF attention of query x over the global tokens (last block per resolution)',
        os.path.join(out_dir, 'maf_attention.png'))]


def draw_mscsa(records: list, image: np.ndarray, out_dir: str,
               points: Sequence[Tuple[float, float]] = QUERY_POINTS) -> List[str]:
    """Per CSA: rows are query points, columns key scales; ``log2(a * N)`` over all ``N`` keys of
    all scales, one scale for the figure; the title gives each scale's share of the attention."""
    paths = []
    for name, csa, x in records:
        attention, sizes = csa_attention(csa, x)
        size = sizes[0]
        n = attention.shape[-1]
        bounds = np.cumsum([0] + [h * w for h, w in sizes])
        panels = []
        for row, point in enumerate(points):
            y, x_ = _query_index(point, size)
            weights = attention[y * size[1] + x_]
            for col, (h, w) in enumerate(sizes):
                heat = weights[bounds[col]:bounds[col + 1]].reshape(h, w).cpu().numpy()
                scale = csa.down[col - 1].stride[0] if col else 1
                panels.append((relative_attention(heat, n),
                               f'q{row + 1}, keys 1/{scale}: sum {heat.sum():.2f}', point))
        paths.append(_attention_figure(
            panels, len(sizes), image, f'log2(attention x N), N = {n}; 0 = uniform',
            f'MSCSA {name}: attention of query x per key scale',
            os.path.join(out_dir, f'mscsa_{_safe(name)}.png')))
    return paths


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def draw_all(model: nn.Module, inputs: torch.Tensor, image: np.ndarray, out_dir: str,
             forward: Optional[Callable[[torch.Tensor], object]] = None) -> List[str]:
    """Run ``forward(inputs)`` (default ``model(inputs)``) once and draw every figure that the
    model's modules allow into ``out_dir``; returns the written paths.

    Args:
        model: any module containing FINE / ASFF / MAF / CSA modules (a timm model of ours, a
            detectron2 model, its backbone).
        inputs: ``(1, 3, H, W)`` tensor as the model expects it (normalised, on its device).
        image: the ``(H, W, 3)`` uint8 RGB image ``inputs`` was made from (drawn underneath).
        out_dir: output directory (created).
        forward: how to run the model, e.g. ``detectron2_model.backbone``.
    """
    os.makedirs(out_dir, exist_ok=True)
    with _eval_mode(model), capture(model) as found, torch.no_grad():
        (forward or model)(inputs)
    return (draw_fine(found['fine'], image, out_dir) + draw_asff(found['asff'], image, out_dir)
            + draw_maf(found['maf'], image, out_dir) + draw_mscsa(found['csa'], image, out_dir))


def erf_maps(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]],
             inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    """Effective receptive field of each stage: ``|d sum_c f_s[c, centre] / d x|`` summed over
    colour channels, averaged over ``inputs`` (each ``(1, 3, H, W)``, same size); one ``(H, W)``
    map per stage output of ``stages``."""
    totals: List[np.ndarray] = []
    for x in inputs:
        x = x.clone().requires_grad_(True)
        outputs = list(stages(x))
        for i, f in enumerate(outputs):
            h, w = f.shape[-2:]
            grad, = torch.autograd.grad(f[0, :, h // 2, w // 2].sum(), x, retain_graph=True)
            g = grad[0].abs().sum(0).cpu().numpy()
            if len(totals) <= i:
                totals.append(np.zeros_like(g))
            totals[i] += g / len(inputs)
    return totals


def draw_erf(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]],
             inputs: Sequence[torch.Tensor], image: np.ndarray, out_dir: str,
             names: Optional[Sequence[str]] = None) -> List[str]:
    """One panel per stage: the effective receptive field (:func:`erf_maps`) as
    ``log(1 + g / mean g)`` (each stage relative to its own mean gradient), one scale from 0."""
    os.makedirs(out_dir, exist_ok=True)
    maps = [np.log1p(g / max(float(g.mean()), 1e-12)) for g in erf_maps(stages, inputs)]
    limits = (0.0, shared_limits(maps)[1])
    fig, axes = _figure(1, len(maps))
    for i, heat in enumerate(maps):
        label = names[i] if names is not None else f'stage {i + 1}'
        im = _overlay(axes[0, i], image, heat, label, limits, cmap='inferno')
    _colorbar(fig, im, axes, 'log(1 + |grad| / mean |grad|)')
    fig.suptitle(f'Effective receptive field of the centre output, mean over {len(inputs)} '
                 f'image(s)', fontsize=9)
    return [_save(fig, os.path.join(out_dir, 'erf.png'))]


def resize_image(image: np.ndarray, size: int, divisor: int) -> np.ndarray:
    """Resize ``(H, W, 3)`` uint8 so the shorter side is about ``size`` and both sides are multiples
    of ``divisor`` (no padding then reaches the drawn maps)."""
    from PIL import Image
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h = max(divisor, int(round(h * scale / divisor)) * divisor)
    new_w = max(divisor, int(round(w * scale / divisor)) * divisor)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def _resize_rgb(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def _draw_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int, divisor: int,
                to_input: Callable[[np.ndarray], torch.Tensor], forward: Callable, stages: Callable,
                names: Optional[Sequence[str]], erf: bool) -> List[str]:
    """The first image resized as :func:`resize_image`, the others to its size, fed through
    ``to_input``; the module maps over the first image and, with ``erf``, the ERF of ``stages``."""
    arrays = [resize_image(images[0], size, divisor)]
    arrays += [_resize_rgb(im, arrays[0].shape[:2]) for im in images[1:]]
    tensors = [to_input(a) for a in arrays]
    paths = draw_all(model, tensors[0], arrays[0], out_dir, forward=forward)
    if erf:
        with _eval_mode(model):
            paths += draw_erf(stages, tensors, arrays[0], out_dir, names=names)
    return paths


def draw_timm_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int = 256,
                    erf: bool = True) -> List[str]:
    """Every figure for a timm classification model of ours (``timm.create_model(name)``): the
    backbone's MAF / CSA maps on ``images[0]``, and the ERF of each ``forward_intermediates``
    stage averaged over all ``images`` (uint8 RGB arrays, resized as :func:`resize_image`)."""
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    mean = torch.tensor(config['mean']).view(1, 3, 1, 1)
    std = torch.tensor(config['std']).view(1, 3, 1, 1)
    device = next(model.parameters()).device

    def to_input(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255 - mean) / std).to(device)

    divisor = 32 * int(getattr(model, 'size_divisibility', 1) or 1)
    return _draw_model(model, images, out_dir, size, divisor, to_input, model.forward_features,
                       lambda x: model.forward_intermediates(x, intermediates_only=True), None, erf)


def draw_detectron2_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str,
                          input_format: str = 'RGB', size: int = 512, erf: bool = True) -> List[str]:
    """Draw every figure the model allows into ``out_dir``; returns the PNG paths.

    Args:
        model: a detectron2 meta-architecture (``GeneralizedRCNN``, ``SemanticSegmentor``, ...)
            with ``backbone``, ``pixel_mean`` and ``pixel_std``.
        images: ``(H, W, 3)`` uint8 RGB images; the maps are drawn over the first, the effective
            receptive field is averaged over all.
        out_dir: output directory.
        input_format: the model's ``INPUT.FORMAT`` ('RGB' or 'BGR').
        size: shorter side the first image is resized to (rounded to the backbone's
            ``size_divisibility``); the others are resized to the same size.
        erf: also draw the ERF of every bottom-up stage (``backbone.bottom_up`` when there is
            one, else the backbone's outputs).
    """
    backbone = model.backbone
    stages = getattr(backbone, 'bottom_up', backbone)
    names = list(stages.output_shape())

    def to_input(a: np.ndarray) -> torch.Tensor:
        a = a[:, :, ::-1] if input_format == 'BGR' else a
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float().to(model.pixel_mean.device)
        return (x - model.pixel_mean) / model.pixel_std

    divisor = max(32, int(getattr(backbone, 'size_divisibility', 0) or 0))
    return _draw_model(model, images, out_dir, size, divisor, to_input, backbone,
                       lambda x: [stages(x)[n] for n in names], names, erf)
