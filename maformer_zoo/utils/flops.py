"""FLOP and parameter counting as the MAFormer and MSCSA papers count (fvcore: one multiply-add is
one flop).

fvcore has no handle for ``F.scaled_dot_product_attention``, so fused attention (ours, timm's PVTv2
and Swin) would cost zero: ``count_flops`` adds one counting the two matrix products it stands for,
``batch * heads * L * S * (E + Ev)``; softmax, scaling and masking are element-wise and not counted,
like the other element-wise operators fvcore skips.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['count_flops', 'count_params', 'sdpa_flop_jit', 'measure_model_stats']


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: the multiply-adds of QK^T and AV of query
    ``(..., L, E)``, key ``(..., S, E)`` and value ``(..., S, Ev)`` (``inputs[0:3]``)."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    return math.prod(q_shape[:-1]) * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def _analyse(model: nn.Module, x: torch.Tensor, analysis_cls: Any, sdpa_handle: Any) -> Any:
    """fvcore's ``analysis_cls`` of ``model(x)``, traced once in eval mode (the mode is restored), warnings off."""
    was_training = model.training
    model.eval()
    try:
        analysis = analysis_cls(model, (x,)).set_op_handle('aten::scaled_dot_product_attention', sdpa_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        with torch.no_grad():
            analysis.total()  # fvcore keeps the counts of this first trace
    finally:
        model.train(was_training)
    return analysis


def count_flops(model: nn.Module, img_size: Union[int, Tuple[int, int]] = (224, 224), in_chans: int = 3,
                batch_size: int = 1) -> float:
    """GFLOPs (multiply-adds, fvcore convention) of one forward pass of ``model`` on a batch of
    ``batch_size`` images of ``img_size`` (``(height, width)`` or one int)."""
    from fvcore.nn import FlopCountAnalysis

    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    param = next(model.parameters(), None)
    x = torch.zeros(batch_size, in_chans, *img_size, device=param.device if param is not None else 'cpu')
    return _analyse(model, x, FlopCountAnalysis, sdpa_flop_jit).total() / 1e9


def count_params(model: nn.Module, trainable_only: bool = False) -> float:
    """Parameters of ``model`` in millions (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only) / 1e6


def _sdpa_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore activation handle for SDPA: what unfused attention materialises, ``Q K^T`` and ``softmax(.) V``."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    return math.prod(q_shape[:-2]) * q_shape[-2] * (k_shape[-2] + v_shape[-1])


def measure_model_stats(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Params (M), GMACs and activations (M) as timm's benchmark.py reports them (model cards): fvcore on one
    ``torch.ones`` image at the model's default input size, rounded to 2 decimals; ``uncounted_ops``: ops
    fvcore has no handle for."""
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    input_size = tuple(input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    flops, acts = (_analyse(model, torch.ones((1, *input_size)), *analysis) for analysis in (
        (FlopCountAnalysis, sdpa_flop_jit), (ActivationCountAnalysis, _sdpa_activation_jit)))
    return dict(params_m=round(count_params(model), 2), gmacs=round(flops.total() / 1e9, 2),
                macts=round(acts.total() / 1e6, 2), img_size=tuple(int(s) for s in input_size[-2:]),
                uncounted_ops=dict(sorted(flops.unsupported_ops().items())))
