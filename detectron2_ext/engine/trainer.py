"""detectron2's ``DefaultTrainer`` with the optimizer and evaluators our configs need.

* :func:`build_optimizer`: AdamW (the papers' detectors) or SGD, no weight decay on norms, biases
  and position tables, and ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'full_model'`` (one norm over all
  parameters, as the papers' MMDetection code bases).
* :func:`build_lr_scheduler`: detectron2's, plus ``SOLVER.LR_SCHEDULER_NAME: WarmupPolyLR``
  (``SOLVER.POLY_LR_POWER``; the semantic segmentation recipes, docs/segmentation.md).
* :func:`build_evaluator`: from the dataset's ``evaluator_type``, as detectron2's ``train_net.py``;
  semantic labels read by :func:`detectron2_ext.data.read_label`.
* ``INPUT.SEM_SEG_PIPELINE 'mmseg'``: :class:`detectron2_ext.data.sem_seg_mapper.SemSegDatasetMapper`.

The rules and the reasons: docs/detectron2.md, "Training extras".
"""
import functools
import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.evaluation import (
    COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator,
)
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.batch_norm import LayerNorm as Detectron2LayerNorm
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as detectron2_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from ..checkpoint import SafeDetectionCheckpointer
from ..data.mapper import DecodingDatasetMapper
from ..data.sem_seg import label_format_of
from ..data.sem_seg_labels import read_label
from ..data.sem_seg_mapper import SemSegDatasetMapper, uses_mmseg_pipeline

__all__ = ['Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator',
           'build_lr_scheduler']
logger = logging.getLogger(__name__)

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.LayerNorm, nn.LocalResponseNorm, FrozenBatchNorm2d, Detectron2LayerNorm,
)


def _declared_no_weight_decay(model: nn.Module) -> set:
    """Full names of parameters that submodules exempt via timm's ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        method = getattr(module, 'no_weight_decay', None)
        if module is model or not callable(method):
            continue
        for name in method():
            names.add(f'{prefix}.{name}' if prefix else name)
    return names


def optimizer_param_groups(
        model: nn.Module,
        weight_decay: float,
        weight_decay_norm: float = 0.0,
        weight_decay_bias: Optional[float] = 0.0,
        no_weight_decay_keywords: List[str] = (),
) -> List[Dict]:
    """Parameter groups by weight decay (see the module docstring for the rules).

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: decay of every other parameter.
        weight_decay_norm: decay of the parameters of normalisation layers.
        weight_decay_bias: decay of biases; ``None`` means ``weight_decay`` (detectron2's default).
        no_weight_decay_keywords: a parameter with one of these as a component of its dotted name
            gets no decay.

    Returns:
        A list of ``{'params': [...], 'weight_decay': wd, 'names': [...]}``, one per distinct decay.
    """
    keywords = set(no_weight_decay_keywords)
    declared = _declared_no_weight_decay(model)
    groups: Dict[float, Dict] = OrderedDict()
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f'{module_name}.{param_name}' if module_name else param_name
            decay = weight_decay
            if isinstance(module, _NORM_TYPES):
                decay = weight_decay_norm
            elif param_name == 'bias' and weight_decay_bias is not None:
                decay = weight_decay_bias
            if keywords & set(full_name.split('.')) or any(
                    full_name == d or full_name.endswith('.' + d) for d in declared):
                decay = 0.0
            group = groups.setdefault(decay, dict(params=[], weight_decay=decay, names=[]))
            group['params'].append(param)
            group['names'].append(full_name)
    return list(groups.values())


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``SOLVER.*`` (AdamW or SGD), with detectron2's gradient clipping."""
    groups = optimizer_param_groups(
        model, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY_BIAS,
        cfg.SOLVER.NO_WEIGHT_DECAY_KEYWORDS)
    for group in groups:
        logger.debug(f"weight decay {group['weight_decay']}: {len(group['names'])} parameters")
        del group['names']
    name = cfg.SOLVER.OPTIMIZER
    if name.lower() == 'adamw':
        optimizer = torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
    elif name.lower() == 'sgd':
        optimizer = torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                    nesterov=cfg.SOLVER.NESTEROV)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r} is not supported: use 'AdamW' or 'SGD'.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == 'full_model':
        return _add_full_model_gradient_clipping(optimizer, clip.CLIP_VALUE, clip.NORM_TYPE)
    return maybe_add_gradient_clipping(cfg, optimizer)


def _add_full_model_gradient_clipping(optimizer: torch.optim.Optimizer, max_norm: float,
                                      norm_type: float) -> torch.optim.Optimizer:
    """Clip the norm of all gradients together before each step (MMDetection's ``grad_clip``).

    detectron2's own ``CLIP_TYPE`` 'value' / 'norm' clip each parameter separately; this adds
    ``'full_model'``. Like detectron2's clipping it swaps the optimizer's class, so the state dict
    and learning-rate schedulers are unaffected; under AMP the scaler unscales before ``step``.
    """
    base = type(optimizer)

    class FullModelGradientClipping(base):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group['params']]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = base.__name__ + 'WithFullModelGradientClip'
    optimizer.__class__ = FullModelGradientClipping
    return optimizer


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's scheduler, or ``WarmupPolyLR``: ``(1 - t / MAX_ITER) ** POLY_LR_POWER`` after
    the warm-up (none when ``SOLVER.WARMUP_ITERS`` is 0)."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != 'WarmupPolyLR':
        return detectron2_build_lr_scheduler(cfg, optimizer)
    schedule = PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER)
    if cfg.SOLVER.WARMUP_ITERS > 0:
        schedule = WarmupParamScheduler(
            schedule, cfg.SOLVER.WARMUP_FACTOR, min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
            cfg.SOLVER.WARMUP_METHOD, cfg.SOLVER.RESCALE_INTERVAL)
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=cfg.SOLVER.MAX_ITER)


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluators:
    """Evaluators for ``dataset_name``, chosen from its ``evaluator_type`` metadata."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, 'inference', dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get('evaluator_type', None)
    evaluators = []
    if evaluator_type in ('sem_seg', 'coco_panoptic_seg'):
        # ground truth through the reader the start-up check and the training mapper use
        loader = functools.partial(read_label, label_format=label_format_of(dataset_name))
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                          sem_seg_loading_fn=loader))
    if evaluator_type in ('coco', 'coco_panoptic_seg'):
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
    if evaluator_type == 'coco_panoptic_seg':
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"No evaluator for dataset '{dataset_name}' (evaluator_type={evaluator_type!r}). "
            f"Register it with train_net.py's --coco-dataset / --coco-panoptic-dataset, or set "
            f"its metadata evaluator_type to 'coco', 'coco_panoptic_seg' or 'sem_seg'.")
    return DatasetEvaluators(evaluators)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with :func:`build_optimizer`, :func:`build_evaluator` and a safe, atomic checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, with two changes: DDP gets no device_ids on the CPU
        # (detectron2's create_ddp_model always passes the local rank, which DDP rejects for CPU
        # modules, so `--num-gpus 2` could not run without GPUs), and the checkpointer reads safely and
        # writes atomically (detectron2_ext.checkpoint).
        TrainerBase.__init__(self)
        if not logging.getLogger('detectron2').isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == 'cpu'
        model = create_ddp_model(model, broadcast_buffers=False, **({'device_ids': None} if on_cpu else {}))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader with our mapper: ``INPUT.SEM_SEG_PIPELINE 'mmseg'`` selects mmseg's
        semantic pipeline, else detectron2's augmentations; images always decoded by ours (16-bit scaled)."""
        mapper = SemSegDatasetMapper if uses_mmseg_pipeline(cfg) else DecodingDatasetMapper
        return build_detection_train_loader(cfg, mapper=mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = SemSegDatasetMapper if uses_mmseg_pipeline(cfg) else DecodingDatasetMapper
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper(cfg, is_train=False))

    def train(self):
        """Train; returns the results of the last evaluation (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set)."""
        results = super().train()
        if results is None:
            results = getattr(self, '_last_eval_results', None)
        return results
