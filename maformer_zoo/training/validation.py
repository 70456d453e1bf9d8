"""Top-1 / top-5 / loss of a model on a dataset split (``scripts/validate.py``).

Weights: the model's pretrained source, a ``checkpoint`` file or neither (random init). Preprocessing is timm's
``resolve_data_config``: the model's ``pretrained_cfg``, then the data config a training run of ours stored in
its checkpoint, then explicit options. A checkpoint of ours (or an export's ``label_names``) also gives
``num_classes`` and the class-folder -> index map.
"""
import json
import os
import time
from typing import Any, Dict

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


def _read_checkpoint(cfg: EvalConfig):
    """The weights of ``cfg.checkpoint`` and what a checkpoint of ours / an export records about them."""
    if not os.path.isfile(cfg.checkpoint):
        raise FileNotFoundError(f"Checkpoint '{cfg.checkpoint}' does not exist.")
    checkpoint = load_checkpoint_file(cfg.checkpoint)
    meta = {k: checkpoint[k] for k in ('num_classes', 'class_to_idx', 'data_config', 'arch') if k in checkpoint}
    names = read_label_names(cfg.checkpoint) if 'class_to_idx' not in meta else None
    if names:
        meta['class_to_idx'] = {name: i for i, name in enumerate(names)}
    if meta.get('arch') and meta['arch'] != cfg.model:
        raise CheckpointMismatchError(
            f"'{cfg.checkpoint}' holds a '{meta['arch']}', not a '{cfg.model}': pass --model {meta['arch']}.")
    if is_folder_dataset(cfg.dataset) and not cfg.class_map and 'class_to_idx' not in meta:
        raise ConfigError(
            f"'{cfg.checkpoint}' does not record which class each output is, so the folders of '{cfg.data_dir}' "
            f"cannot be mapped to its labels: pass --class-map FILE (the training class folders, one per line, "
            f"in order), or use a checkpoint of ours or a push_to_hub.py export (config.json label_names).")
    state_dict = unwrap_state_dict(checkpoint, 'auto' if cfg.use_ema else 'model')[0]
    if not cfg.num_classes and 'num_classes' not in meta:  # the head's rows
        classifier = get_pretrained_cfg_value(cfg.model, 'classifier') or 'head'
        classifier = classifier if isinstance(classifier, str) else classifier[0]
        rows = [state_dict[k].shape[0] for k in (f'{classifier}.weight', f'{classifier}.fc.weight') if k in state_dict]
        meta['num_classes'] = int(rows[0]) if rows else None
    return state_dict, meta


def _model(cfg: EvalConfig, state_dict, meta: Dict[str, Any]):
    in_chans = cfg.in_chans or (1 if cfg.input_img_mode == 'L' else None)
    model = create_model_for_run(cfg.model, num_classes=cfg.num_classes or meta.get('num_classes'),
                                 pretrained=cfg.pretrained, in_chans=in_chans, **cfg.model_kwargs)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"'{cfg.checkpoint}' does not fit '{cfg.model}' with "
                                          f"{cfg.num_classes or meta.get('num_classes')} classes: {err}") from err
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names') if cfg.pretrained else None
    if names and 'class_to_idx' not in meta:  # an export's config.json label_names (timm reads them)
        order = sorted(names, key=int) if isinstance(names, dict) else range(len(names))
        meta['class_to_idx'] = {str(names[k]): i for i, k in enumerate(order)}
    stored = meta.get('data_config') or {}  # the training run's preprocessing, unless an option says otherwise
    given = {'input_size': cfg.input_size or cfg.img_size, 'interpolation': cfg.interpolation, 'mean': cfg.mean,
             'std': cfg.std, 'crop_pct': cfg.crop_pct, 'crop_mode': cfg.crop_mode}
    fill = {k: stored[k] for k, v in given.items() if stored.get(k) is not None and v in (None, '')}
    return model, resolve_run_data_config({**vars(cfg), 'in_chans': in_chans, **fill}, model)


def validate(cfg: EvalConfig) -> Dict[str, Any]:
    """Evaluate as configured; returns the metrics (also written to ``cfg.results_file``)."""
    check_model_name(cfg.model)
    if cfg.results_file:  # checked before the (long) evaluation; never replaces a file
        check_run_folder(os.path.dirname(os.path.abspath(cfg.results_file)), "--results-file's folder", resuming=True)
        if os.path.lexists(cfg.results_file):
            raise RunFolderError(f"--results-file '{cfg.results_file}' exists: give a new file name (nothing was "
                                 f"changed).")
    ctx = setup_distributed(cfg.device)
    state_dict, meta = _read_checkpoint(cfg) if cfg.checkpoint else (None, {})
    model, data_config = _model(cfg, state_dict, meta)
    model.to(ctx.device).eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    class_map = cfg.class_map or (meta.get('class_to_idx') if is_folder_dataset(cfg.dataset) else None)
    dataset = build_dataset(cfg.dataset, cfg.data_dir, cfg.split, is_training=False, class_map=class_map,
                            input_img_mode=cfg.input_img_mode, batch_size=cfg.batch_size)
    loader = build_eval_loader(dataset, data_config, cfg.batch_size, cfg.num_workers, ctx.world_size,
                               ctx.rank, cfg.pin_memory, skip_bad=cfg.skip_bad_images)
    start = time.perf_counter()
    metrics = evaluate(model, loader, ctx, amp_context(ctx.device, cfg.amp, cfg.amp_dtype), cfg.channels_last,
                       cfg.progress)
    results = dict(model=cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained, split=cfg.split,
                   top1=round(metrics['top1'], 3), top5=round(metrics['top5'], 3), loss=round(metrics['loss'], 5),
                   count=metrics['count'], param_count_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                   input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
                   interpolation=data_config['interpolation'],
                   img_per_s=round(metrics['count'] / max(time.perf_counter() - start, 1e-9), 1))
    if cfg.skip_bad_images:  # over all processes: every image is either counted or skipped
        results.update(skipped=len(dataset) - metrics['count'], skipped_files=loader.skipped[:20])
    if cfg.results_file and ctx.is_primary:
        write_atomic(cfg.results_file, json.dumps(results, indent=2))
    return results
