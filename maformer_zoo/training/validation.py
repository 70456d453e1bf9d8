"""Top-1 / top-5 / loss of a model on a dataset split (``scripts/validate.py``).

The weights come from the model's pretrained source (``pretrained=True``), a file (``checkpoint``:
``.safetensors`` or a checkpoint of ours / timm's, read with ``weights_only=True``), or neither
(random init, for smoke tests). The data pipeline is timm's: ``resolve_data_config`` takes the
input size, crop_pct, interpolation and mean/std from the model's ``pretrained_cfg``, then from the
data config a training run of ours stored in its checkpoint, then from explicit options (highest).
A checkpoint of ours also supplies ``num_classes`` and the class-folder -> index map it was trained
with, so a validation folder is labelled exactly as the training folder was.
"""
import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

import torch
from timm.models import get_pretrained_cfg_value

from ..errors import CheckpointMismatchError
from ..utils.atomic import write_atomic
from ..weights import load_checkpoint_file, read_label_names, unwrap_state_dict
from .config import ConfigError
from .data import build_dataset, build_eval_loader, is_folder_dataset
from .engine import amp_context, evaluate, resolve_run_data_config, setup_distributed
from .modeling import check_model_name, create_model_for_run
from .options import EvalConfig
from .run_folder import RunFolderError, check_run_folder

__all__ = ['validate']

_logger = logging.getLogger(__name__)


def _checkpoint_meta(checkpoint: Any, path: str) -> Dict[str, Any]:
    """``num_classes``, ``class_to_idx``, ``data_config`` and ``arch`` a checkpoint of ours carries, or the
    class names an export records in its ``config.json`` (``label_names``)."""
    meta = {k: checkpoint[k] for k in ('num_classes', 'class_to_idx', 'data_config', 'arch') if k in checkpoint}
    if 'class_to_idx' not in meta:
        names = read_label_names(path)
        if names:
            meta['class_to_idx'] = {name: i for i, name in enumerate(names)}
    return meta


def _label_names(pretrained_cfg: Dict[str, Any]) -> Optional[List[str]]:
    """Class names by output index from a pretrained cfg's ``label_names`` (a list, or {index: name})."""
    names = pretrained_cfg.get('label_names')
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return [str(n) for n in names] if names else None


def _head_classes(model_name: str, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    classifier = get_pretrained_cfg_value(model_name, 'classifier') or 'head'
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    for key in (f'{classifier}.weight', f'{classifier}.fc.weight'):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def validate(cfg: EvalConfig) -> Dict[str, Any]:
    """Evaluate as configured; returns the metrics (also written to ``cfg.results_file``)."""
    check_model_name(cfg.model)
    if cfg.results_file:  # checked before the (long) evaluation; never replaces a file
        check_run_folder(os.path.dirname(os.path.abspath(cfg.results_file)), f"--results-file's folder", resuming=True)
        if os.path.lexists(cfg.results_file):
            raise RunFolderError(f"--results-file '{cfg.results_file}' exists: give a new file name (nothing was "
                                 f"changed).")
    ctx = setup_distributed(cfg.device)
    meta, state_dict = {}, None
    if cfg.checkpoint:
        if not os.path.isfile(cfg.checkpoint):
            raise FileNotFoundError(f"Checkpoint '{cfg.checkpoint}' does not exist.")
        checkpoint = load_checkpoint_file(cfg.checkpoint)
        meta = _checkpoint_meta(checkpoint, cfg.checkpoint)
        if meta.get('arch') and meta['arch'] != cfg.model:
            raise CheckpointMismatchError(
                f"'{cfg.checkpoint}' holds a '{meta['arch']}', not a '{cfg.model}': pass --model {meta['arch']}.")
        state_dict, _ = unwrap_state_dict(checkpoint, 'auto' if cfg.use_ema else 'model')
        if is_folder_dataset(cfg.dataset) and not cfg.class_map and 'class_to_idx' not in meta:
            raise ConfigError(
                f"'{cfg.checkpoint}' does not record which class each output is, so the folders of '{cfg.data_dir}' "
                f"cannot be mapped to its labels: pass --class-map FILE (the training class folders, one per line, "
                f"in order), or use a checkpoint of ours or a push_to_hub.py export (config.json label_names).")
    num_classes = cfg.num_classes or meta.get('num_classes') or (
        _head_classes(cfg.model, state_dict) if state_dict is not None else None)
    in_chans = cfg.in_chans or (1 if cfg.input_img_mode == 'L' else None)
    model = create_model_for_run(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained,
                                 in_chans=in_chans, **cfg.model_kwargs)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise CheckpointMismatchError(
                f"'{cfg.checkpoint}' does not fit '{cfg.model}' with {num_classes} classes: {err}") from err
    if cfg.pretrained and 'class_to_idx' not in meta:  # an export's config.json label_names (timm reads them)
        names = _label_names(getattr(model, 'pretrained_cfg', None) or {})
        if names:
            meta['class_to_idx'] = {name: i for i, name in enumerate(names)}
    model.to(ctx.device).eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    stored = meta.get('data_config') or {}
    overrides = cfg
    if stored:  # the training run's preprocessing, unless the command line says otherwise
        fill = {'input_size': stored.get('input_size') if cfg.input_size is None and cfg.img_size is None else None,
                'interpolation': stored.get('interpolation') if not cfg.interpolation else None,
                'mean': stored.get('mean') if cfg.mean is None else None,
                'std': stored.get('std') if cfg.std is None else None,
                'crop_pct': stored.get('crop_pct') if cfg.crop_pct is None else None,
                'crop_mode': stored.get('crop_mode') if not cfg.crop_mode else None}
        overrides = dataclasses.replace(cfg, in_chans=in_chans, **{k: v for k, v in fill.items() if v is not None})
    data_config = resolve_run_data_config(overrides, model)

    class_map = cfg.class_map or (meta.get('class_to_idx') if is_folder_dataset(cfg.dataset) else None)
    dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.split, is_training=False, class_map=class_map,
                            input_img_mode=cfg.input_img_mode, batch_size=cfg.batch_size)
    loader = build_eval_loader(dataset, data_config, cfg.batch_size, cfg.num_workers, ctx.world_size,
                               ctx.rank, cfg.pin_memory, skip_bad=cfg.skip_bad_images)
    start = time.perf_counter()
    metrics = evaluate(model, loader, ctx, amp_context(ctx.device, cfg.amp, cfg.amp_dtype),
                       cfg.channels_last, cfg.progress)
    elapsed = time.perf_counter() - start
    results = {
        'model': cfg.model, 'checkpoint': cfg.checkpoint, 'pretrained': cfg.pretrained, 'split': cfg.split,
        'top1': round(metrics['top1'], 3), 'top5': round(metrics['top5'], 3), 'loss': round(metrics['loss'], 5),
        'count': metrics['count'], 'param_count_m': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        'input_size': list(data_config['input_size']), 'crop_pct': data_config['crop_pct'],
        'interpolation': data_config['interpolation'], 'img_per_s': round(metrics['count'] / max(elapsed, 1e-9), 1),
    }
    if cfg.skip_bad_images:  # over all processes: every image is either counted or skipped
        results['skipped'] = len(dataset) - metrics['count']
        results['skipped_files'] = loader.skipped[:20]
    if cfg.results_file and ctx.is_primary:
        write_atomic(cfg.results_file, json.dumps(results, indent=2))
    return results
