"""detectron2's ``DefaultTrainer`` with the optimizer, schedule, evaluators and run files our configs need.

Parameter groups: detectron2's ``get_default_optimizer_params``; gradient clipping: detectron2's,
plus ``CLIP_TYPE 'full_model'`` through detectron2's own global clipper; ``WarmupPolyLR``:
DeepLab's (``detectron2.projects.deeplab``). Checkpoints read safely and write atomically
(:mod:`detectron2_ext.checkpoint`); ``--resume`` cuts ``metrics.json`` back to its checkpoint.
The rules and the reasons: docs/detectron2.md#training-extras-detectron2_extengine.
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


def optimizer_param_groups(
        model: nn.Module,
        weight_decay: float,
        weight_decay_norm: float = 0.0,
        weight_decay_bias: Optional[float] = 0.0,
        no_weight_decay_keywords: List[str] = (),
) -> List[Dict]:
    """detectron2's parameter groups, plus no decay for what timm models list in ``no_weight_decay()``.

    Args:
        model: the model; frozen parameters (``requires_grad=False``) are left out.
        weight_decay: decay of every other parameter.
        weight_decay_norm: decay of normalisation layers (detectron2's list, and detectron2's ``LN``).
        weight_decay_bias: decay of biases; ``None`` means ``weight_decay`` (detectron2's default).
        no_weight_decay_keywords: parameter names without decay (detectron2's ``overrides``).

    Returns:
        ``[{'params': [...], 'weight_decay': wd, 'names': [...]}]``, one group per decay, groups and
        parameters in the model's order (the layout of the optimizer state our checkpoints hold).
    """
    groups = get_default_optimizer_params(
        model, weight_decay=weight_decay, weight_decay_norm=weight_decay_norm, weight_decay_bias=weight_decay_bias,
        overrides={name: {'weight_decay': 0.0} for name in no_weight_decay_keywords})
    # Later groups override earlier ones parameter by parameter (detectron2's reduce_param_groups):
    # detectron2's own LayerNorm is missing from its norm list, and timm names parameters by full name.
    declared = _declared_no_weight_decay(model)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    ln = [p for m in model.modules() if isinstance(m, Detectron2LayerNorm) for p in m.parameters() if p.requires_grad]
    groups = reduce_param_groups(groups + [{'params': ln, 'weight_decay': weight_decay_norm},
                                           {'params': [p for n, p in trained if n in declared], 'weight_decay': 0.0}])
    order = {p: (i, name) for i, (name, p) in enumerate(trained)}
    for group in groups:
        group['params'].sort(key=order.__getitem__)
        group['names'] = [order[p][1] for p in group['params']]
    return sorted(groups, key=lambda g: order[g['params'][0]])


def _declared_no_weight_decay(model: nn.Module) -> set:
    """Full names of parameters that submodules exempt via timm's ``no_weight_decay()``."""
    return {f'{prefix}.{name}' if prefix else name for prefix, module in model.named_modules()
            if module is not model and callable(getattr(module, 'no_weight_decay', None))
            for name in module.no_weight_decay()}


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
    if name.lower() == 'adamw':
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


def cut_metrics(path: str, start_iter: int) -> None:
    """Keep the rows of ``metrics.json`` before ``start_iter``; drop the rest and any partial last row.

    detectron2's ``JSONWriter`` only appends whole rows, so a kill leaves complete rows and at most
    one partial row at the end; rows past a resumed checkpoint describe iterations that run again.
    The kept rows are a prefix of the file, cut by one ``truncate`` (done or not, never half) in
    place: the writer's append handle, already open, then continues at the new end.
    """
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
        # DefaultTrainer.__init__'s steps; detectron2 has no hook for two of them. DDP gets no device_ids
        # on the CPU (create_ddp_model always passes the local rank, which DDP rejects for CPU modules, so
        # `--num-gpus 2` could not run without GPUs), and the checkpointer, which the hooks capture, is ours.
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

    def resume_or_load(self, resume=True):
        """detectron2's; resuming also cuts ``metrics.json`` back to the checkpoint (:func:`cut_metrics`)."""
        super().resume_or_load(resume=resume)
        if resume and comm.is_main_process():
            cut_metrics(os.path.join(self.cfg.OUTPUT_DIR, 'metrics.json'), self.start_iter)

    def train(self):
        """Train; returns the results of the last evaluation (detectron2 returns them only when
        ``TEST.EXPECTED_RESULTS`` is set)."""
        results = super().train()
        if results is None:
            results = getattr(self, '_last_eval_results', None)
        return results
