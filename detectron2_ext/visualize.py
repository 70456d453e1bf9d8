"""Figures of what FINE, ASFF, MAF and MSCSA do and of each stage's effective receptive field, drawn
with matplotlib over an image, from a detectron2 model (:func:`draw_detectron2_model`) or a timm model
of ours (:func:`draw_timm_model`). Forward pre-hooks record the modules' inputs; the maps come from the
modules' own methods and weights. Files and colour scales: docs/segmentation.md#scriptsvisualizepy.
Here, not in the model package, because only these drawing users need matplotlib.
"""
import os
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from maformer_zoo.layers.asff import ASFFLevel
from maformer_zoo.layers.fine import FINE
from maformer_zoo.layers.maf import GlobalLearningDownsample, MultiScaleAttentionFusion
from maformer_zoo.layers.mscsa import CrossScaleAttention

# relative (y, x) positions of the query tokens drawn for MAF and CSA
QUERY_POINTS: Tuple[Tuple[float, float], ...] = ((0.3, 0.25), (0.5, 0.5), (0.75, 0.7))
ASFF_LIMITS = (0.0, 1.0)  # ASFF weights are a softmax over the sources: always this scale
ATTENTION_FLOOR = 1.0     # log2(a * N) is drawn on at least [-1, 1]: half to twice uniform
MODULATION_FLOOR = 0.1    # FINE's M (F_low -> F_low * (1 + M)) on at least [-0.1, 0.1]
_KINDS = {FINE: 'fine', ASFFLevel: 'asff', GlobalLearningDownsample: 'gld', MultiScaleAttentionFusion: 'maf',
          CrossScaleAttention: 'csa'}


@contextmanager
def capture(model: nn.Module):
    """Record the inputs of every FINE, ASFFLevel, MAF fusion (with its GLD's map size and grid) and CSA.

    Yields a dict ``{'fine': [(name, module, low, high)], 'asff': [(name, module, features)],
    'maf': [(name, module, x_local, x_global, (H, W), grid)], 'csa': [(name, module, x)]}``, filled
    when the ``with`` block ends (the last call of each module).
    """
    records: Dict[str, Dict[str, tuple]] = {kind: {} for kind in _KINDS.values()}

    def hook(kind: str, name: str):
        def record(module, args):
            args = tuple(a.detach() if torch.is_tensor(a) else [t.detach() for t in a] for a in args)
            parent = name.rpartition('.')[0]
            if kind == 'gld':  # the map size and grid of the MAF fusion next to it
                records[kind][parent] = (tuple(args[0].shape[1:3]), tuple(module.grid_size))
            elif kind == 'maf':
                records[kind][name] = (name, module, *args[:2], *records['gld'].get(parent, (None, None)))
            else:
                records[kind][name] = (name, module, *args)
        return record

    handles = [module.register_forward_pre_hook(hook(kind, name)) for name, module in model.named_modules()
               for cls, kind in _KINDS.items() if isinstance(module, cls)]
    found: Dict[str, list] = {}
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        found.update({kind: list(r.values()) for kind, r in records.items() if kind != 'gld'})


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
    """Softmax attention of image 0's local tokens over the global tokens (Eq. 3), mean over heads:
    ``(N_local, N_global)``."""
    heads, head_dim = maf.num_heads, maf.head_dim
    q = maf.q(x_local[:1]).reshape(1, x_local.shape[1], heads, head_dim).transpose(1, 2)
    k = maf.kv(x_global[:1]).reshape(1, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4)[0]
    return (q @ k.transpose(-1, -2) * head_dim ** -0.5).softmax(-1).mean(1)[0]


@torch.no_grad()
def csa_attention(csa: CrossScaleAttention, x: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """Softmax attention of image 0's queries over the keys of all scales (Eq. 5-6), mean over heads:
    ``(h * w, sum of key tokens)``, and the ``(h, w)`` of each key scale in order."""
    x = x[:1]
    q, k0, _ = csa.qkv(x).split(csa.split_qkv, dim=1)
    keys, sizes = [csa._heads(k0, csa.key_dim)], [tuple(x.shape[-2:])]
    for down, kv in zip(csa.down, csa.kv):
        k_i, _ = kv(down(x)).split(csa.split_kv, dim=1)
        keys.append(csa._heads(k_i, csa.key_dim))
        sizes.append(tuple(k_i.shape[-2:]))
    q = csa._heads(q, csa.key_dim).transpose(-1, -2)
    return (q @ torch.cat(keys, dim=-1) * csa.scale).softmax(-1).mean(1)[0], sizes


def relative_attention(attention: np.ndarray, num_keys: int) -> np.ndarray:
    """``log2(a * N)``: 0 where the attention is uniform (``1 / N``), +1 at twice uniform."""
    return np.log2(np.maximum(attention * num_keys, 1e-12))


def symmetric_limits(arrays: Sequence[np.ndarray], floor: float) -> Tuple[float, float]:
    """``(-L, L)``, ``L`` the largest magnitude over ``arrays`` but at least ``floor``, so that a map
    that barely moves from 0 stays near the middle of the scale instead of filling it."""
    top = max(max(float(np.abs(a).max()) for a in arrays), floor)
    return -top, top


def shared_limits(arrays: Sequence[np.ndarray]) -> Tuple[float, float]:
    """One ``(min, max)`` over all ``arrays`` (one scale for panels of one quantity)."""
    return min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)


def _figure(rows: int, cols: int):
    fig = Figure(figsize=(2.6 * cols + 1.0, 2.3 * rows + 0.5), layout='constrained')
    return fig, fig.subplots(rows, cols, squeeze=False)


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str, limits: Tuple[float, float],
             interpolation: str = 'bilinear', cmap: str = 'viridis'):
    """``heat`` stretched over ``image`` (matplotlib resamples it), on the colour scale ``limits``."""
    ax.imshow(image)
    h, w = image.shape[:2]
    im = ax.imshow(heat, cmap=cmap, alpha=0.6, vmin=limits[0], vmax=limits[1], interpolation=interpolation,
                   extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax.set_title(title, fontsize=8)
    ax.axis('off')
    return im


def _colorbar(fig, im, axes, label: str) -> None:
    bar = fig.colorbar(im, ax=list(np.ravel(axes)), shrink=0.9, pad=0.02)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _save(fig, title: str, path: str) -> str:
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=72)
    return path


def _file_name(name: str) -> str:
    return name.replace('.', '_') or 'model'


def _query_index(point: Tuple[float, float], size: Tuple[int, int]) -> Tuple[int, int]:
    return min(int(point[0] * size[0]), size[0] - 1), min(int(point[1] * size[1]), size[1] - 1)


def draw_fine(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Per FINE: ``F_high``, ``F_low`` and aligned ``F_low`` (channel means) on one scale, ``M``
    (channel mean; 0 = ``F_low`` unchanged) on a symmetric one."""
    paths = []
    for name, fine, low, high in records:
        maps = {label: x.float().mean(0).cpu().numpy() for label, x in fine_maps(fine, low, high).items()}
        features = ('F_high', 'F_low', 'F_low aligned')
        limits = shared_limits([maps[label] for label in features])
        fig, axes = _figure(1, 4)
        for ax, label in zip(axes[0], features):
            im = _overlay(ax, image, maps[label], f'{label} {maps[label].shape}', limits)
        _colorbar(fig, im, axes[0, :3], 'channel mean')
        im = _overlay(axes[0, 3], image, maps['M'], f"M {maps['M'].shape}",
                      symmetric_limits([maps['M']], MODULATION_FLOOR), cmap='RdBu_r')
        _colorbar(fig, im, axes[0, 3], 'M, channel mean')
        paths.append(_save(fig, f'FINE {name}', os.path.join(out_dir, f'fine_{_file_name(name)}.png')))
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
                          f'out {level.level} <- in {col} (mean {weights[col].mean():.2f})', ASFF_LIMITS)
    _colorbar(fig, im, axes, 'ASFF weight (sums to 1 over a row)')
    return [_save(fig, 'ASFF weights: rows output level, columns source level (finest first)',
                  os.path.join(out_dir, 'asff_weights.png'))]


def _attention_figure(panels: list, cols: int, image: np.ndarray, bar: str, title: str, path: str) -> str:
    """``panels`` of ``(log2(a * N) map, title, query point)``, ``cols`` per row, on one symmetric
    scale of at least +-1, each with its query point marked."""
    limits = symmetric_limits([p[0] for p in panels], ATTENTION_FLOOR)
    fig, axes = _figure(len(panels) // cols, cols)
    for ax, (heat, label, point) in zip(axes.flat, panels):
        im = _overlay(ax, image, heat, label, limits, interpolation='nearest', cmap='RdBu_r')
        ax.plot(point[1] * image.shape[1], point[0] * image.shape[0], 'wx', markersize=9, mew=2.5)
    _colorbar(fig, im, axes, bar)
    return _save(fig, title, path)


def draw_maf(records: list, image: np.ndarray, out_dir: str,
             points: Sequence[Tuple[float, float]] = QUERY_POINTS) -> List[str]:
    """The last MAF block at each local resolution: attention of each query over the global grid."""
    last_per_size = {record[4]: record for record in records if record[4] is not None}
    panels = []
    for name, maf, x_local, x_global, size, grid in last_per_size.values():
        attention = maf_attention(maf, x_local, x_global)
        for col, point in enumerate(points):
            y, x = _query_index(point, size)
            heat = attention[y * size[1] + x].reshape(grid).cpu().numpy()
            panels.append((relative_attention(heat, attention.shape[-1]),
                           f'local {size[0]}x{size[1]}, q{col + 1}', point))
    if not panels:
        return []
    return [_attention_figure(panels, len(points), image, 'log2(attention x N), 0 = uniform',
                              'MAF attention of query x over the global tokens (last block per resolution)',
                              os.path.join(out_dir, 'maf_attention.png'))]


def draw_mscsa(records: list, image: np.ndarray, out_dir: str,
               points: Sequence[Tuple[float, float]] = QUERY_POINTS) -> List[str]:
    """Per CSA: rows are query points, columns key scales; ``log2(a * N)`` over all ``N`` keys of all
    scales; the titles give each scale's share of the attention."""
    paths = []
    for name, csa, x in records:
        attention, sizes = csa_attention(csa, x)
        n = attention.shape[-1]
        bounds = np.cumsum([0] + [h * w for h, w in sizes])
        panels = []
        for row, point in enumerate(points):
            y, x_ = _query_index(point, sizes[0])
            weights = attention[y * sizes[0][1] + x_]
            for col, (h, w) in enumerate(sizes):
                heat = weights[bounds[col]:bounds[col + 1]].reshape(h, w).cpu().numpy()
                scale = csa.down[col - 1].stride[0] if col else 1
                panels.append((relative_attention(heat, n), f'q{row + 1}, keys 1/{scale}: sum {heat.sum():.2f}',
                               point))
        paths.append(_attention_figure(panels, len(sizes), image, f'log2(attention x N), N = {n}; 0 = uniform',
                                       f'MSCSA {name}: attention of query x per key scale',
                                       os.path.join(out_dir, f'mscsa_{_file_name(name)}.png')))
    return paths


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def draw_all(model: nn.Module, inputs: torch.Tensor, image: np.ndarray, out_dir: str,
             forward: Optional[Callable[[torch.Tensor], object]] = None) -> List[str]:
    """Run ``forward(inputs)`` (default ``model(inputs)``; ``inputs`` is the uint8 RGB ``image`` as the
    model's ``(1, 3, H, W)`` input) and draw every figure ``model``'s modules allow into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with _eval_mode(model), capture(model) as found, torch.no_grad():
        (forward or model)(inputs)
    return (draw_fine(found['fine'], image, out_dir) + draw_asff(found['asff'], image, out_dir)
            + draw_maf(found['maf'], image, out_dir) + draw_mscsa(found['csa'], image, out_dir))


def erf_maps(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]],
             inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    """Effective receptive field of each stage output of ``stages``: ``|d sum_c f_s[c, centre] / d x|``
    summed over colour channels, averaged over ``inputs`` (each ``(1, 3, H, W)``, same size)."""
    totals: List[np.ndarray] = []
    for x in inputs:
        x = x.clone().requires_grad_(True)
        for i, f in enumerate(stages(x)):
            h, w = f.shape[-2:]
            grad, = torch.autograd.grad(f[0, :, h // 2, w // 2].sum(), x, retain_graph=True)
            g = grad[0].abs().sum(0).cpu().numpy()
            if len(totals) <= i:
                totals.append(np.zeros_like(g))
            totals[i] += g / len(inputs)
    return totals


def draw_erf(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
             image: np.ndarray, out_dir: str, names: Optional[Sequence[str]] = None) -> List[str]:
    """One panel per stage: :func:`erf_maps` as ``log(1 + g / mean g)``, on one scale from 0."""
    os.makedirs(out_dir, exist_ok=True)
    maps = [np.log1p(g / max(float(g.mean()), 1e-12)) for g in erf_maps(stages, inputs)]
    limits = (0.0, shared_limits(maps)[1])
    fig, axes = _figure(1, len(maps))
    for i, heat in enumerate(maps):
        im = _overlay(axes[0, i], image, heat, names[i] if names else f'stage {i + 1}', limits, cmap='inferno')
    _colorbar(fig, im, axes, 'log(1 + |grad| / mean |grad|)')
    return [_save(fig, f'Effective receptive field of the centre output, mean over {len(inputs)} image(s)',
                  os.path.join(out_dir, 'erf.png'))]


def _draw_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int, divisor: int,
                normalize: Callable[[torch.Tensor], torch.Tensor], forward: Callable, stages: Callable,
                names: Optional[Sequence[str]], erf: bool) -> List[str]:
    """The images resized so the first one's shorter side is about ``size`` and both sides are multiples
    of ``divisor`` (no padding then reaches a map); module maps over the first, with ``erf`` the ERF of
    ``stages`` over all; ``normalize`` turns a ``(1, 3, H, W)`` float RGB 0-255 batch into model input."""
    scale = size / min(images[0].shape[:2])
    width, height = (max(divisor, int(round(s * scale / divisor)) * divisor) for s in images[0].shape[1::-1])
    arrays = [np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR)) for im in images]
    tensors = [normalize(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()) for a in arrays]
    paths = draw_all(model, tensors[0], arrays[0], out_dir, forward=forward)
    if erf:
        with _eval_mode(model):
            paths += draw_erf(stages, tensors, arrays[0], out_dir, names=names)
    return paths


def draw_timm_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int = 256,
                    erf: bool = True) -> List[str]:
    """Every figure for a timm model of ours: the MAF / CSA maps over ``images[0]`` (uint8 RGB) and
    the ERF of each ``forward_intermediates`` stage over all ``images``; returns the PNG paths."""
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    device = next(model.parameters()).device
    return _draw_model(model, images, out_dir, size, 32, lambda x: ((x / 255 - mean) / std).to(device),
                       model.forward_features, lambda x: model.forward_intermediates(x, intermediates_only=True),
                       None, erf)


def draw_detectron2_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str,
                          input_format: str = 'RGB', size: int = 512, erf: bool = True) -> List[str]:
    """Every figure for a detectron2 meta-architecture (``backbone``, ``pixel_mean``, ``pixel_std``):
    the neck and backbone maps over ``images[0]`` (uint8 RGB; ``input_format`` is the config's
    ``INPUT.FORMAT``) resized to shorter side ``size``, and with ``erf`` the ERF of every bottom-up
    stage (``backbone.bottom_up``, else the backbone) over all ``images``; returns the PNG paths."""
    backbone = model.backbone
    stages = getattr(backbone, 'bottom_up', backbone)
    names = list(stages.output_shape())

    def normalize(x: torch.Tensor) -> torch.Tensor:
        x = (x.flip(1) if input_format == 'BGR' else x).to(model.pixel_mean.device)
        return (x - model.pixel_mean) / model.pixel_std

    return _draw_model(model, images, out_dir, size, max(32, backbone.size_divisibility or 0), normalize,
                       backbone, lambda x: [stages(x)[n] for n in names], names, erf)
