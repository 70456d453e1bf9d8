"""FLOP and parameter counting as the MAFormer and MSCSA papers count (fvcore: one multiply-add is
one flop).

fvcore has no handle for ``F.scaled_dot_product_attention``, so fused attention (ours, timm's PVTv2
and Swin) would cost zero: ``count_flops`` adds one counting the two matrix products it stands for,
``batch * heads * L * S * (E + Ev)``; softmax, scaling and masking are element-wise and not counted,
like the other element-wise operators fvcore skips.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ['count_flops', 'count_params', 'sdpa_flop_jit', 'measure_model_stats']


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention`` (multiply-adds of QK^T and AV).

    ``inputs[0:3]`` are query ``(..., L, E)``, key ``(..., S, E)`` and value ``(..., S, Ev)``.
    """
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch_dims, length_q, dim_qk = q_shape
    length_kv = k_shape[-2]
    dim_v = v_shape[-1]
    batch = 1
    for d in batch_dims:
        batch *= d
    return batch * length_q * length_kv * (dim_qk + dim_v)


def count_flops(
        model: nn.Module,
        img_size: Union[int, Tuple[int, int]] = (224, 224),
        in_chans: int = 3,
        batch_size: int = 1,
) -> float:
    """GFLOPs (multiply-adds, fvcore convention) of one forward pass of ``model``.

    Args:
        model: the module to count; it is put in eval mode for the count and restored afterwards.
        img_size: input ``(height, width)``, or one int for a square input.
        in_chans: input channels.
        batch_size: images per forward; the result is for the whole batch.

    Returns:
        The count in units of 1e9.
    """
    from fvcore.nn import FlopCountAnalysis

    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
        x = torch.zeros(batch_size, in_chans, *img_size, device=device)
        analysis = FlopCountAnalysis(model, (x,))
        analysis.set_op_handle('aten::scaled_dot_product_attention', sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        with torch.no_grad():
            total = analysis.total()
    finally:
        model.train(was_training)
    return total / 1e9


def count_params(model: nn.Module, trainable_only: bool = False) -> float:
    """Parameters of ``model`` in millions (all of them, or only those with ``requires_grad``)."""
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only) / 1e6


def _sdpa_activation_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore activation handle for ``aten::scaled_dot_product_attention``: what unfused attention
    materialises, the attention matrix (``Q K^T``) and the output (``softmax(.) V``)."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    batch = 1
    for d in q_shape[:-2]:
        batch *= d
    return batch * q_shape[-2] * (k_shape[-2] + v_shape[-1])


def measure_model_stats(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Params (M), GMACs and activations (M) as timm's benchmark.py reports them (model cards).

    fvcore on one ``torch.ones`` image at the model's default input size, with the SDPA handles
    above; rounded as timm rounds (2 decimals). ``uncounted_ops`` lists ops fvcore has no handle for.
    """
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    input_size = tuple(input_size or (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224)))
    example = torch.ones((1, *input_size))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = FlopCountAnalysis(model, example).set_op_handle(
                'aten::scaled_dot_product_attention', sdpa_flop_jit)
            acts = ActivationCountAnalysis(model, example).set_op_handle(
                'aten::scaled_dot_product_attention', _sdpa_activation_jit)
            for analysis in (flops, acts):
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            macs, activations = flops.total(), acts.total()
            uncounted = dict(sorted(flops.unsupported_ops().items()))
    finally:
        model.train(was_training)
    return dict(params_m=round(count_params(model), 2), gmacs=round(macs / 1e9, 2), macts=round(activations / 1e6, 2),
                img_size=tuple(int(s) for s in input_size[-2:]), uncounted_ops=uncounted)
