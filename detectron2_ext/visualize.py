"""Figures of what FINE, ASFF, MAF and MSCSA do and of each stage's effective receptive field, drawn
with matplotlib over an image, from a detectron2 model (:func:`draw_detectron2_model`) or a timm model
of ours (:func:`draw_timm_model`). Forward pre-hooks record the modules' inputs; the maps come from the
modules' own methods and weights. Files and colour scales: docs/segmentation.md#scriptsvisualizepy.
Here, not in the model package, because only these drawing users need matplotlib.
"""
import os
from contextlib import contextmanager
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.evaluation import inference_context
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
    """Yields ``{'fine': [(name, module, low, high)], 'asff': [(name, module, features)], 'maf': [(name,
    module, x_local, x_global, (H, W), grid)], 'csa': [(name, module, x)]}``, the inputs of each module's last
    call in the ``with`` block (MAF with its GLD's map size and grid), filled when the block ends."""
    records: Dict[str, Dict[str, tuple]] = {kind: {} for kind in _KINDS.values()}

    def record(kind: str, name: str, module: nn.Module, args: tuple) -> None:
        args = tuple(a.detach() if torch.is_tensor(a) else [t.detach() for t in a] for a in args)
        parent = name.rpartition('.')[0]
        if kind == 'gld':  # the map size and grid of the MAF fusion next to it
            records[kind][parent] = (tuple(args[0].shape[1:3]), tuple(module.grid_size))
        elif kind == 'maf':
            records[kind][name] = (name, module, *args[:2], *records['gld'].get(parent, (None, None)))
        else:
            records[kind][name] = (name, module, *args)

    handles = [module.register_forward_pre_hook(partial(record, kind, name)) for name, module in model.named_modules()
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
def maf_attention(maf: MultiScaleAttentionFusion, x_local: torch.Tensor, x_global: torch.Tensor) -> torch.Tensor:
    """Attention of image 0's local tokens over the global tokens (Eq. 3), mean over heads: ``(N_local, N_global)``."""
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
    """``(-L, L)``, ``L`` the largest magnitude over ``arrays`` but at least ``floor`` (a near-0 map stays pale)."""
    top = max(max(float(np.abs(a).max()) for a in arrays), floor)
    return -top, top


def shared_limits(arrays: Sequence[np.ndarray]) -> Tuple[float, float]:
    """One ``(min, max)`` over all ``arrays`` (one scale for panels of one quantity)."""
    return min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)


def _save_figure(path: str, title: str, image: np.ndarray, rows: List[list], interpolation: str = 'bilinear') -> str:
    """``rows`` of panels ``(heat, title, scale, query point or None)`` over ``image`` (matplotlib resamples
    ``heat`` to it), ``scale = ((vmin, vmax), cmap, label)``; one colour bar per scale."""
    fig = Figure(figsize=(2.6 * len(rows[0]) + 1.0, 2.3 * len(rows) + 0.5), layout='constrained')
    bars: Dict[tuple, list] = {}
    panels = [panel for row in rows for panel in row]
    for ax, (heat, label, scale, point) in zip(fig.subplots(len(rows), len(rows[0]), squeeze=False).flat, panels):
        (vmin, vmax), cmap, _ = scale
        ax.imshow(image)
        im = ax.imshow(heat, cmap=cmap, alpha=0.6, vmin=vmin, vmax=vmax, interpolation=interpolation,
                       extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        if point is not None:
            ax.plot(point[1] * image.shape[1], point[0] * image.shape[0], 'wx', markersize=9, mew=2.5)
        ax.set_title(label, fontsize=8)
        ax.axis('off')
        bars.setdefault(scale, [im, []])[1].append(ax)
    for (_, _, label), (im, axes) in bars.items():
        bar = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.02)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=72)
    return path


def _query_token(point: Tuple[float, float], size: Tuple[int, int]) -> int:
    """The index of the token at relative ``point = (y, x)`` of an ``(h, w)`` map."""
    return min(int(point[0] * size[0]), size[0] - 1) * size[1] + min(int(point[1] * size[1]), size[1] - 1)


def draw_fine(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Per FINE: ``F_high``, ``F_low``, aligned ``F_low`` on one scale, ``M`` on a symmetric one (channel means)."""
    paths = []
    for name, fine, low, high in records:
        maps = {label: x.float().mean(0).cpu().numpy() for label, x in fine_maps(fine, low, high).items()}
        features = (shared_limits([maps['F_high'], maps['F_low'], maps['F_low aligned']]), 'viridis', 'channel mean')
        modulation = (symmetric_limits([maps['M']], MODULATION_FLOOR), 'RdBu_r', 'M, channel mean')
        panels = [(maps[k], f'{k} {maps[k].shape}', modulation if k == 'M' else features, None)
                  for k in ('F_high', 'F_low', 'F_low aligned', 'M')]
        path = os.path.join(out_dir, f"fine_{name.replace('.', '_') or 'model'}.png")
        paths.append(_save_figure(path, f'FINE {name}', image, [panels]))
    return paths


def draw_asff(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Rows: output levels; columns: source levels (finest first); weights on a fixed 0-1 scale."""
    scale = (ASFF_LIMITS, 'viridis', 'ASFF weight (sums to 1 over a row)')
    rows = []
    for name, level, features in records:
        weights = asff_weights(level, features).cpu().numpy()
        rows.append([(w, f'out {level.level} <- in {col} (mean {w.mean():.2f})', scale, None)
                     for col, w in enumerate(weights)])
    if not rows:
        return []
    return [_save_figure(os.path.join(out_dir, 'asff_weights.png'),
                         'ASFF weights: rows output level, columns source level (finest first)', image, rows)]


def _attention_figure(path: str, title: str, image: np.ndarray, rows: List[list], bar: str) -> str:
    """Panels ``(log2(a * N), title, query point)``, on one symmetric scale of at least +-1."""
    scale = (symmetric_limits([heat for row in rows for heat, _, _ in row], ATTENTION_FLOOR), 'RdBu_r', bar)
    return _save_figure(path, title, image, [[(heat, label, scale, point) for heat, label, point in row]
                                             for row in rows], interpolation='nearest')


def draw_maf(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """The last MAF block at each local resolution: attention of each query over the global grid."""
    rows = []
    for name, maf, x_local, x_global, size, grid in {r[4]: r for r in records if r[4] is not None}.values():
        attention = maf_attention(maf, x_local, x_global)
        heats = [attention[_query_token(point, size)].reshape(grid).cpu().numpy() for point in QUERY_POINTS]
        rows.append([(relative_attention(heat, attention.shape[-1]), f'local {size[0]}x{size[1]}, q{col + 1}', point)
                     for col, (heat, point) in enumerate(zip(heats, QUERY_POINTS))])
    if not rows:
        return []
    return [_attention_figure(os.path.join(out_dir, 'maf_attention.png'),
                              'MAF attention of query x over the global tokens (last block per resolution)',
                              image, rows, 'log2(attention x N), 0 = uniform')]


def draw_mscsa(records: list, image: np.ndarray, out_dir: str) -> List[str]:
    """Per CSA: rows are query points, columns key scales (titles: each scale's share of the attention)."""
    paths = []
    for name, csa, x in records:
        attention, sizes = csa_attention(csa, x)
        n, strides = attention.shape[-1], [1] + [down.stride[0] for down in csa.down]
        rows = []
        for row, point in enumerate(QUERY_POINTS):
            per_scale = attention[_query_token(point, sizes[0])].split([h * w for h, w in sizes])
            heats = [weights.reshape(size).cpu().numpy() for weights, size in zip(per_scale, sizes)]
            rows.append([(relative_attention(heat, n), f'q{row + 1}, keys 1/{stride}: sum {heat.sum():.2f}', point)
                         for heat, stride in zip(heats, strides)])
        paths.append(_attention_figure(os.path.join(out_dir, f"mscsa_{name.replace('.', '_') or 'model'}.png"),
                                       f'MSCSA {name}: attention of query x per key scale', image, rows,
                                       f'log2(attention x N), N = {n}; 0 = uniform'))
    return paths


def erf_maps(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]],
             inputs: Sequence[torch.Tensor]) -> List[np.ndarray]:
    """Effective receptive field of each stage output of ``stages``: ``|d sum_c f_s[c, centre] / d x|``
    summed over colour channels, averaged over ``inputs`` (each ``(1, 3, H, W)``, same size)."""
    per_input = []
    for x in inputs:
        x = x.clone().requires_grad_(True)
        centres = [f[0, :, f.shape[-2] // 2, f.shape[-1] // 2].sum() for f in stages(x)]
        per_input.append([torch.autograd.grad(c, x, retain_graph=True)[0][0].abs().sum(0).cpu().numpy()
                          for c in centres])
    return [np.mean(maps, axis=0) for maps in zip(*per_input)]


def draw_erf(stages: Callable[[torch.Tensor], Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
             image: np.ndarray, out_dir: str, names: Optional[Sequence[str]] = None) -> List[str]:
    """One panel per stage: :func:`erf_maps` as ``log(1 + g / mean g)``, on one scale from 0."""
    os.makedirs(out_dir, exist_ok=True)
    maps = [np.log1p(g / max(float(g.mean()), 1e-12)) for g in erf_maps(stages, inputs)]
    scale = ((0.0, shared_limits(maps)[1]), 'inferno', 'log(1 + |grad| / mean |grad|)')
    panels = [(heat, names[i] if names else f'stage {i + 1}', scale, None) for i, heat in enumerate(maps)]
    return [_save_figure(os.path.join(out_dir, 'erf.png'), f'Effective receptive field of the centre output, '
                         f'mean over {len(inputs)} image(s)', image, [panels])]


def _draw_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int, divisor: int,
                normalize: Callable[[torch.Tensor], torch.Tensor], forward: Callable, stages: Callable,
                names: Optional[Sequence[str]], erf: bool) -> List[str]:
    """Module maps over ``images[0]``, with ``erf`` the ERF of ``stages``, the images resized to shorter side
    ~``size`` and sides multiples of ``divisor`` (no padding reaches a map); ``normalize``: RGB 0-255 to input."""
    scale = size / min(images[0].shape[:2])
    width, height = (max(divisor, int(round(s * scale / divisor)) * divisor) for s in images[0].shape[1::-1])
    arrays = [np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR)) for im in images]
    tensors = [normalize(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()) for a in arrays]
    os.makedirs(out_dir, exist_ok=True)
    with inference_context(model):  # eval mode, then the model's own mode again
        with capture(model) as found, torch.no_grad():
            forward(tensors[0])
        image = arrays[0]
        paths = (draw_fine(found['fine'], image, out_dir) + draw_asff(found['asff'], image, out_dir)
                 + draw_maf(found['maf'], image, out_dir) + draw_mscsa(found['csa'], image, out_dir))
        return paths + (draw_erf(stages, tensors, image, out_dir, names=names) if erf else [])


def draw_timm_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str, size: int = 256,
                    erf: bool = True) -> List[str]:
    """Every figure for a timm model of ours: MAF / CSA maps over ``images[0]`` (uint8 RGB), the ERF of
    each ``forward_intermediates`` stage over all ``images``; the PNG paths."""
    from timm.data import resolve_data_config
    config = resolve_data_config({}, model=model)
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    device = next(model.parameters()).device
    return _draw_model(model, images, out_dir, size, 32, lambda x: ((x / 255 - mean) / std).to(device),
                       model.forward_features, lambda x: model.forward_intermediates(x, intermediates_only=True),
                       None, erf)


def draw_detectron2_model(model: nn.Module, images: Sequence[np.ndarray], out_dir: str,
                          input_format: str = 'RGB', size: int = 512, erf: bool = True) -> List[str]:
    """Every figure for a detectron2 meta-architecture (``input_format``: its ``INPUT.FORMAT``): neck and
    backbone maps over ``images[0]`` (uint8 RGB), the ERF of every bottom-up stage over all; the PNG paths."""
    backbone = model.backbone
    stages = getattr(backbone, 'bottom_up', backbone)
    names = list(stages.output_shape())

    def normalize(x: torch.Tensor) -> torch.Tensor:
        x = (x.flip(1) if input_format == 'BGR' else x).to(model.pixel_mean.device)
        return (x - model.pixel_mean) / model.pixel_std

    return _draw_model(model, images, out_dir, size, max(32, backbone.size_divisibility or 0), normalize,
                       backbone, lambda x: [stages(x)[n] for n in names], names, erf)
