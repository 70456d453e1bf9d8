"""detectron2's ``DefaultTrainer`` with our optimizer, evaluators, mappers and safe, atomic checkpointer.

Parameter groups: detectron2's ``get_default_optimizer_params``; clipping: detectron2's (``'full_model'``
through its global clipper); ``WarmupPolyLR``: DeepLab's. Rules and reasons:
docs/detectron2.md#training-extras-detectron2_extengine.
"""
import functools
import json
import logging
import os
import weakref
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.layers.batch_norm import LayerNorm as Detectron2LayerNorm
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping, get_default_optimizer_params, maybe_add_gradient_clipping,
    reduce_param_groups,
)
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import SafeDetectionCheckpointer
from ..data.mapper import DecodingDatasetMapper
from ..data.sem_seg import label_format_of
from ..data.sem_seg_labels import read_label
from ..data.sem_seg_mapper import SemSegDatasetMapper, uses_mmseg_pipeline

__all__ = ['Trainer', 'build_optimizer', 'optimizer_param_groups', 'build_evaluator', 'build_lr_scheduler',
           'cut_metrics']
logger = logging.getLogger(__name__)

_OPTIMIZERS = {'adamw': torch.optim.AdamW, 'sgd': torch.optim.SGD}


def optimizer_param_groups(model: nn.Module, weight_decay: float, weight_decay_norm: float = 0.0,
                           weight_decay_bias: Optional[float] = 0.0, no_weight_decay_keywords: List[str] = ()
                           ) -> List[Dict]:
    """detectron2's parameter groups (frozen parameters left out; ``weight_decay_bias`` None: ``weight_decay``),
    plus no decay for detectron2's ``LN`` and what timm models list in ``no_weight_decay()``. Returns
    ``[{'params', 'weight_decay', 'names'}]``, one group per decay, groups and parameters in the model's
    order (the layout of the optimizer state our checkpoints hold)."""
    groups = get_default_optimizer_params(
        model, weight_decay=weight_decay, weight_decay_norm=weight_decay_norm, weight_decay_bias=weight_decay_bias,
        overrides={name: {'weight_decay': 0.0} for name in no_weight_decay_keywords})
    # Later groups override earlier ones parameter by parameter (detectron2's reduce_param_groups):
    # detectron2's own LayerNorm is missing from its norm list, and timm names parameters by full name.
    declared = {f'{prefix}.{name}' if prefix else name for prefix, module in model.named_modules()
                if module is not model and callable(getattr(module, 'no_weight_decay', None))
                for name in module.no_weight_decay()}  # timm's no_weight_decay(), as full names
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ln = [p for m in model.modules() if isinstance(m, Detectron2LayerNorm) for p in m.parameters() if p.requires_grad]
    groups = reduce_param_groups(groups + [{'params': ln, 'weight_decay': weight_decay_norm},
                                           {'params': [p for n, p in trained if n in declared], 'weight_decay': 0.0}])
    order = {p: (i, name) for i, (name, p) in enumerate(trained)}
    for group in groups:
        group['params'].sort(key=order.__getitem__)
        group['names'] = [order[p][1] for p in group['params']]
    return sorted(groups, key=lambda g: order[g['params'][0]])


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` (AdamW or SGD) on :func:`optimizer_param_groups`, with detectron2's gradient clipping."""
    name = cfg.SOLVER.OPTIMIZER
    if name.lower() not in _OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r} is not supported: use 'AdamW' or 'SGD'.")
    groups = optimizer_param_groups(
        model, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY_BIAS,
        cfg.SOLVER.NO_WEIGHT_DECAY_KEYWORDS)
    for group in groups:
        logger.debug(f"weight decay {group['weight_decay']}: {len(group['names'])} parameters")
        del group['names']
    clip = cfg.SOLVER.CLIP_GRADIENTS
    optimizer_class = _OPTIMIZERS[name.lower()]
    if clip.ENABLED and clip.CLIP_TYPE == 'full_model':  # one norm over all parameters (MMDetection's grad_clip)
        optimizer_class = _generate_optimizer_class_with_gradient_clipping(
            optimizer_class, global_clipper=functools.partial(
                torch.nn.utils.clip_grad_norm_, max_norm=clip.CLIP_VALUE, norm_type=clip.NORM_TYPE))
    else:  # detectron2's per-parameter 'value' / 'norm'; given a class, it returns a class
        optimizer_class = maybe_add_gradient_clipping(cfg, optimizer_class)
    if name.lower() == 'adamw':  # the two calls are dev/mutations.py's targets
        return optimizer_class(groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), fused=cfg.SOLVER.FUSED)
    return optimizer_class(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV,
                           fused=cfg.SOLVER.FUSED)


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


def _mapper(cfg, is_train: bool):
    return (SemSegDatasetMapper if uses_mmseg_pipeline(cfg) else DecodingDatasetMapper)(cfg, is_train=is_train)


def cut_metrics(path: str, start_iter: int) -> None:
    """Keep the whole rows of ``metrics.json`` before ``start_iter`` (rows past a resumed checkpoint run
    again); one in-place ``truncate``, done or not, after which detectron2's open append handle continues."""
    if not os.path.isfile(path):
        return
    keep = 0
    with open(path, 'rb') as f:
        for line in f:
            try:
                complete = line.endswith(b'\n') and json.loads(line).get('iteration', -1) < start_iter
            except (ValueError, AttributeError):
                complete = False
            if not complete:
                break
            keep += len(line)
    if keep < os.path.getsize(path):
        os.truncate(path, keep)
        with open(path, 'rb') as f:
            os.fsync(f.fileno())


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with :func:`build_optimizer`, :func:`build_evaluator` and a safe, atomic checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ but DDP gets no device_ids on the CPU, which detectron2 has no hook for (docs/)
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

    build_optimizer = staticmethod(build_optimizer)
    build_lr_scheduler = staticmethod(build_lr_scheduler)  # DeepLab's: detectron2's and WarmupPolyLR
    build_evaluator = staticmethod(build_evaluator)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader with our mapper (mmseg's pipeline for ``INPUT.SEM_SEG_PIPELINE 'mmseg'``)."""
        return build_detection_train_loader(cfg, mapper=_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=_mapper(cfg, is_train=False))

    def resume_or_load(self, resume=True):
        """detectron2's; resuming also cuts ``metrics.json`` back to the checkpoint (:func:`cut_metrics`)."""
        super().resume_or_load(resume=resume)
        if resume and comm.is_main_process():
            cut_metrics(os.path.join(self.cfg.OUTPUT_DIR, 'metrics.json'), self.start_iter)

    def train(self):
        """Train; returns the last evaluation's results (detectron2's only with ``TEST.EXPECTED_RESULTS``)."""
        results = super().train()
        return getattr(self, '_last_eval_results', None) if results is None else results
