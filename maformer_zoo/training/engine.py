"""The training and evaluation loops, wired from timm's parts as timm's ``train.py`` wires them; ours are the exact
per-process resume, the run-folder rules (:mod:`.run_folder`) and the logs (docs/training.md).
"""
import contextlib
import json
import logging
import math
import os
import time
from functools import partial
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from timm.data import Mixup, resolve_data_config
from timm.data.loader import adapt_to_chs
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, distribute_bn, random_seed, unwrap_model
from timm.utils.distributed import init_distributed_device_so
from tqdm import tqdm

from ..utils.atomic import write_atomic
from .checkpoint import RunSaver, capture_rng_state, load_training_checkpoint, restore_rng_state
from .config import ConfigError
from .data import DatasetError, build_dataset, build_eval_loader, build_train_loader, dataset_classes, \
    is_folder_dataset
from .modeling import check_model_name, create_model_for_run
from .options import RESUME_MAY_CHANGE, TrainConfig
from .run_folder import check_resume_changes, check_run_folder, default_run_name, find_resumable_run, rewrite_csv

__all__ = ['setup_distributed', 'resolve_run_data_config', 'amp_context', 'train_one_epoch', 'evaluate', 'train']

_logger = logging.getLogger(__name__)


def setup_distributed(device: str = '', backend: Optional[str] = None, url: str = 'env://') -> SimpleNamespace:
    """Join the process group when launched by torchrun; where this process runs and its rank."""
    info = init_distributed_device_so(device=device or ('cuda' if torch.cuda.is_available() else 'cpu'),
                                      dist_backend=backend, dist_url=url)
    return SimpleNamespace(device=torch.device(info['device']), distributed=info['distributed'],
                           world_size=info['world_size'], rank=info['global_rank'], is_primary=info['global_rank'] == 0)


def resolve_run_data_config(options: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm's data config (input size, crop_pct, interpolation, mean/std) with the ``options`` that are set."""
    in_chans = getattr(model, 'in_chans', None) or options.get('in_chans') or 3
    data_config = resolve_data_config({**options, 'in_chans': in_chans}, model=model)
    data_config['input_size'] = (in_chans, *data_config['input_size'][1:])  # pretrained_cfg assumes 3 channels
    data_config['mean'] = adapt_to_chs(data_config['mean'], in_chans)
    data_config['std'] = adapt_to_chs(data_config['std'], in_chans)
    return data_config


def amp_context(device: torch.device, enabled: bool, dtype: str) -> Callable[[], Any]:
    """A factory of autocast contexts (null contexts when AMP is off)."""
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, dtype)) if enabled \
        else contextlib.nullcontext


def train_one_epoch(run: SimpleNamespace, epoch: int, progress: Optional[Any] = None) -> Dict[str, float]:
    """One epoch of optimizer steps over ``run``'s parts (see :func:`_build`); returns its metrics. A step averages
    ``grad_accum_steps`` micro-batches (fewer at the end of the epoch, as in timm), DDP-synchronised on the last."""
    cfg, ctx, model, optimizer = run.cfg, run.ctx, run.model, run.optimizer
    model.train()
    accum, num_batches = cfg.grad_accum_steps, len(run.train_loader)
    last_window_start = num_batches - (num_batches % accum or accum)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, images
    window_loss, start = 0.0, time.perf_counter()
    for index, (images, targets) in enumerate(run.train_loader):
        need_update = index == num_batches - 1 or (index + 1) % accum == 0
        window = accum if index < last_window_start else num_batches - last_window_start
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with model.no_sync() if ctx.distributed and not need_update else contextlib.nullcontext():
            with run.autocast():
                loss = run.loss_fn(model(images), targets)
            if run.loss_scaler is not None:
                run.loss_scaler(loss / window, optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                                parameters=model.parameters(), need_update=need_update)
            else:
                (loss / window).backward()
                if need_update and cfg.clip_grad:
                    dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
                if need_update:
                    optimizer.step()
        totals += torch.stack([loss.detach().double() * images.size(0), totals.new_tensor(images.size(0))])
        window_loss += loss.item() / window
        if need_update:
            run.num_updates += 1
            _after_step(run, epoch, window_loss, progress)
            window_loss = 0.0
    if ctx.distributed:
        dist.all_reduce(totals)
    return {'loss': (totals[0] / totals[1].clamp(min=1)).item(),
            'img_per_s': totals[1].item() / max(time.perf_counter() - start, 1e-9),
            'lr': optimizer.param_groups[0]['lr']}


def _after_step(run: SimpleNamespace, epoch: int, loss: float, progress: Optional[Any]) -> None:
    """EMA, schedule and the step's log (``train_steps.csv``, progress bar or log line)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(unwrap_model(run.model), step=run.num_updates)
    run.scheduler.step_update(num_updates=run.num_updates)
    lr = run.optimizer.param_groups[0]['lr']
    if run.steps_csv:  # an append per step: a row cut by a kill is removed on resume (docs/training.md)
        with open(run.steps_csv, 'a') as f:
            f.write(f'{epoch},{run.num_updates},{loss!r},{lr!r}\n')
    if progress is not None:
        progress.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.3g}', refresh=False)
        progress.update(1)
    elif run.ctx.is_primary and run.cfg.log_interval and run.num_updates % run.cfg.log_interval == 0:
        _logger.info('epoch %d step %d loss %.4f lr %.3g', epoch, run.num_updates, loss, lr)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, ctx: SimpleNamespace, autocast: Callable[[], Any] = contextlib.nullcontext,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) over the loader, summed over all processes."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, images
    for images, targets in tqdm(loader, desc='eval', leave=False, disable=not (progress and ctx.is_primary)):
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images).float()
        n = targets.size(0)
        top1, top5 = accuracy(logits, targets, topk=(1, 5))
        totals += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(), top1.double() * n / 100,
                               top5.double() * n / 100, totals.new_tensor(n)])
    if ctx.distributed:
        dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    return {'loss': totals[0].item() / count, 'top1': 100.0 * round(totals[1].item()) / count,
            'top5': 100.0 * round(totals[2].item()) / count, 'count': int(totals[3].item())}


def _check_options(cfg: TrainConfig) -> None:
    """Options timm would take and fail on later, or never."""
    if cfg.grad_accum_steps < 1 or cfg.checkpoint_hist < 1:
        raise ConfigError('grad_accum_steps and checkpoint_hist must be >= 1.')
    try:
        info = get_optimizer_info(cfg.opt.lower().split('_')[-1])
    except ValueError:
        raise ConfigError(f"--opt {cfg.opt!r} is not an optimizer of timm.optim.list_optimizers().") from None
    if (info.defaults or {}).get('nesterov') and cfg.momentum <= 0:
        raise ConfigError(f"--opt {cfg.opt} is SGD with Nesterov momentum, which needs --momentum > 0; for plain "
                          f"SGD use --opt momentum (with --momentum 0: no momentum).")
    check_model_name(cfg.model)  # before the (possibly slow) dataset scan


def _run_folder(cfg: TrainConfig, ctx: SimpleNamespace):
    """The run folder and the checkpoint to continue ('' for a new run), the run-folder rule checked."""
    run_dir = os.path.join(cfg.output, cfg.experiment) if cfg.experiment else None
    if run_dir is None:  # without one, the run --resume auto continues, else a new dated folder
        found = find_resumable_run(cfg.output, cfg.model) if cfg.resume == 'auto' else None
        run_dir = [found or os.path.join(cfg.output, default_run_name(cfg.model, time.strftime('%Y%m%d-%H%M%S')))]
        if ctx.distributed:  # one folder for all processes, whatever their clocks say
            dist.broadcast_object_list(run_dir, src=0)
        run_dir = run_dir[0]
    if cfg.resume == 'auto':  # continue the folder's last checkpoint if there is one (preemptible jobs)
        check_run_folder(run_dir, f"Run folder '{run_dir}'", resuming=True)
        last = os.path.join(run_dir, 'last.pth')
        return run_dir, last if os.path.isfile(last) else ''
    same_run = bool(cfg.resume) and os.path.realpath(os.path.dirname(os.path.abspath(cfg.resume))) == \
        os.path.realpath(run_dir)
    check_run_folder(run_dir, f"Run folder '{run_dir}'", resuming=same_run,
                     hint='continue it with --resume auto, or choose another --experiment'
                          + (f" for a new run from '{cfg.resume}'" if cfg.resume else ''))
    return run_dir, cfg.resume


def _datasets(cfg: TrainConfig):
    """Training and validation sets (validation labelled with training's class map) and the class count."""
    common = dict(input_img_mode=cfg.input_img_mode, seed=cfg.seed, batch_size=cfg.batch_size)
    train_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, True, cfg.class_map, **common)
    class_to_idx = dataset_classes(train_set)
    val_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, False, class_to_idx if is_folder_dataset(
        cfg.dataset) else cfg.class_map, **common) if cfg.val_split else None
    num_classes = cfg.num_classes or (max(class_to_idx.values()) + 1 if class_to_idx else None)
    if num_classes is None:
        raise DatasetError(f"Cannot tell the number of classes of dataset '{cfg.dataset}': set --num-classes.")
    if class_to_idx and max(class_to_idx.values()) >= num_classes:
        raise ConfigError(f'num_classes={num_classes} but the data has {len(class_to_idx)} classes.')
    return train_set, val_set, class_to_idx, num_classes


def _model(cfg: TrainConfig, ctx: SimpleNamespace, num_classes: int, in_chans: Optional[int], resuming: bool):
    random_seed(cfg.seed, 0)  # the same initial weights on every process
    model = create_model_for_run(
        cfg.model, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate,
        pretrained=cfg.pretrained and not resuming and not cfg.pretrained_file,  # a given file wins
        weights_file=cfg.pretrained_file if not resuming else '', drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
    if cfg.grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise ConfigError(f"Model '{cfg.model}' does not support gradient checkpointing.")
        model.set_grad_checkpointing(True)
    model.to(ctx.device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _build(cfg: TrainConfig, ctx: SimpleNamespace, resuming: bool) -> SimpleNamespace:
    """Data, model, optimizer, schedule, loss, EMA and mixing of a run, as timm's train.py builds them."""
    train_set, val_set, class_to_idx, num_classes = _datasets(cfg)
    in_chans = cfg.in_chans or (1 if cfg.input_img_mode == 'L' else None)
    model = _model(cfg, ctx, num_classes, in_chans, resuming)
    data_config = resolve_run_data_config({**vars(cfg), 'in_chans': in_chans}, model)
    random_seed(cfg.seed, ctx.rank)  # augmentation randomness differs per process, as in timm
    train_loader = build_train_loader(train_set, data_config, cfg, ctx.world_size, ctx.rank)
    val_loader = None if val_set is None else build_eval_loader(
        val_set, data_config, cfg.batch_size, cfg.num_workers, ctx.world_size, ctx.rank, cfg.pin_memory)
    global_batch = cfg.batch_size * cfg.grad_accum_steps * ctx.world_size
    lr = cfg.lr * global_batch / cfg.lr_base_batch_size if cfg.lr_base_batch_size else cfg.lr
    opt_kwargs = {k: v for k, v in (('eps', cfg.opt_eps), ('betas', cfg.opt_betas)) if v is not None}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                    layer_decay=cfg.layer_decay, **opt_kwargs)
    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, cooldown_epochs=cfg.cooldown_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        plateau_mode='min' if cfg.eval_metric == 'loss' else 'max',
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                  prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                  label_smoothing=cfg.smoothing, num_classes=num_classes) \
        if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None else None
    if cfg.bce_loss:
        loss_fn = BinaryCrossEntropy(smoothing=0.0 if mixup else cfg.smoothing)
    else:  # Mixup applies the label smoothing to its soft targets
        loss_fn = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.smoothing) \
            if cfg.smoothing else nn.CrossEntropyLoss()
    return SimpleNamespace(
        cfg=cfg, ctx=ctx, model=model, optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, lr=lr,
        train_loader=train_loader, val_loader=val_loader, mixup=mixup, loss_fn=loss_fn.to(ctx.device),
        ema=ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None,
        loss_scaler=NativeScaler(device=ctx.device.type) if cfg.amp and cfg.amp_dtype == 'float16' else None,
        autocast=amp_context(ctx.device, cfg.amp, cfg.amp_dtype), num_classes=num_classes, class_to_idx=class_to_idx,
        data_config=data_config, global_batch=global_batch, updates_per_epoch=updates_per_epoch, num_updates=0,
        start_epoch=0, steps_csv='', rng_state=None)


def _resume(run: SimpleNamespace, path: str, checkpoint: Dict[str, Any]) -> None:
    """timm's ``resume_checkpoint`` (model, optimizer, loss scaler, epoch), then what it leaves to us:
    scheduler, EMA, step counter and this process's random-number states."""
    if checkpoint.get('arch') != run.cfg.model:
        raise ConfigError(f"Checkpoint '{path}' is of model '{checkpoint.get('arch')}', not '{run.cfg.model}'.")
    run.start_epoch = resume_checkpoint(run.model, path, run.optimizer, run.loss_scaler, log_info=run.ctx.is_primary)
    run.scheduler.load_state_dict(checkpoint['scheduler'])
    if run.ema is not None and checkpoint.get('state_dict_ema') is not None:
        run.ema.module.load_state_dict(checkpoint['state_dict_ema'])
    run.num_updates = checkpoint['num_updates']
    states = checkpoint.get('rng') or []
    if len(states) == run.ctx.world_size:
        run.rng_state = states[run.ctx.rank]
    elif run.ctx.is_primary:
        _logger.warning('Checkpoint was written by %d processes, this run has %d: data order is the same, '
                        'augmentation randomness is not.', len(states), run.ctx.world_size)


def _prepare_folder(run: SimpleNamespace, run_dir: str, saved: Dict[str, Any]) -> None:
    """On the primary process: the logs cut back to the checkpoint (a killed process wrote past it), the
    settings' changes recorded, ``config.yaml`` as the run started."""
    cfg = run.cfg
    os.makedirs(run_dir, exist_ok=True)
    rewrite_csv(os.path.join(run_dir, 'summary.csv'), lambda row: int(row['epoch']) <= run.start_epoch)
    run.steps_csv = os.path.join(run_dir, 'train_steps.csv')
    rewrite_csv(run.steps_csv, lambda row: int(row['step']) <= run.num_updates)
    if not os.path.isfile(run.steps_csv):
        write_atomic(run.steps_csv, 'epoch,step,loss,lr\n')
    check_resume_changes(saved, vars(cfg), RESUME_MAY_CHANGE, cfg.allow_changes, run_dir, f'epoch {run.start_epoch}')
    if not os.path.isfile(os.path.join(run_dir, 'config.yaml')):
        write_atomic(os.path.join(run_dir, 'config.yaml'), yaml.safe_dump(vars(cfg), sort_keys=False))
    _logger.info('%s: %.2fM params, %d classes, input %s, global batch %d, lr %.3g, %d steps/epoch, %d processes',
                 cfg.model, sum(p.numel() for p in run.model.parameters()) / 1e6, run.num_classes,
                 run.data_config['input_size'], run.global_batch, run.lr, run.updates_per_epoch, run.ctx.world_size)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary (on every process)."""
    ctx = setup_distributed(cfg.device, cfg.dist_backend, cfg.dist_url)
    try:
        return _train(cfg, ctx)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: SimpleNamespace) -> Dict[str, Any]:
    _check_options(cfg)
    run_dir, resume = _run_folder(cfg, ctx)  # the run-folder rule, checked before anything is written
    checkpoint = load_training_checkpoint(resume) if resume else None
    saved = (checkpoint or {}).get('config') or {}
    if checkpoint is None and cfg.resume == 'auto' and os.path.isfile(os.path.join(run_dir, 'config.yaml')):
        with open(os.path.join(run_dir, 'config.yaml'), encoding='utf-8') as f:  # killed before its first checkpoint
            saved = yaml.safe_load(f) or {}
    check_resume_changes(saved, vars(cfg), RESUME_MAY_CHANGE, cfg.allow_changes, run_dir,
                         f"epoch {checkpoint['epoch'] if checkpoint else 0}", record=False)
    run = _build(cfg, ctx, resuming=checkpoint is not None)
    saver = RunSaver(run_dir, decreasing=cfg.eval_metric == 'loss', max_history=cfg.checkpoint_hist) \
        if ctx.is_primary else None
    if checkpoint is not None:
        _resume(run, resume, checkpoint)
    if saver is not None:
        _prepare_folder(run, run_dir, saved)
        if checkpoint is not None:
            saver.resume(resume, checkpoint)
    if ctx.distributed:
        run.model = DistributedDataParallel(run.model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda'
                                            else None)
    if run.start_epoch > 0:  # each call acts only in its own mode (per-epoch or per-update)
        run.scheduler.step(run.start_epoch)
        run.scheduler.step_update(run.num_updates)
    if run.rng_state is not None:  # last, so that nothing above consumes the restored streams
        restore_rng_state(run.rng_state)
    started, metrics = time.perf_counter(), {}
    end = min(run.num_epochs, cfg.stop_epoch if cfg.stop_epoch is not None else run.num_epochs)
    for epoch in range(run.start_epoch, end):
        metrics = _epoch(run, epoch, saver)
    best = [saver and saver.best_metric, saver and saver.best_epoch]
    if ctx.distributed:  # the primary's best, on every process
        dist.broadcast_object_list(best, src=0)
    summary = dict(model=cfg.model, run_dir=run_dir, epochs_done=max(end, run.start_epoch), epochs_total=run.num_epochs,
                   optimizer_steps=run.num_updates, global_batch=run.global_batch, lr=run.lr,
                   world_size=ctx.world_size, num_classes=run.num_classes, train=metrics.get('train', {}),
                   eval=metrics.get('eval', {}), ema_eval=metrics.get('ema', {}), eval_metric=cfg.eval_metric,
                   best_metric=best[0], best_epoch=best[1], seconds=time.perf_counter() - started)
    if saver is not None:
        write_atomic(os.path.join(run_dir, 'summary.json'), json.dumps(summary, indent=2))
        _logger.info('Done: %d/%d epochs, best %s %s (epoch %s); run folder %s', summary['epochs_done'],
                     run.num_epochs, cfg.eval_metric, best[0], best[1], run_dir)
    return summary


def _epoch(run: SimpleNamespace, epoch: int, saver: Optional[RunSaver]) -> Dict[str, Dict[str, float]]:
    """Train one epoch, evaluate, and (primary process) log and save; returns the epoch's metrics."""
    cfg, ctx = run.cfg, run.ctx
    run.train_loader.sampler.set_epoch(epoch)
    if run.mixup is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
        run.mixup.mixup_enabled = False
    with tqdm(total=run.updates_per_epoch, desc=f'epoch {epoch + 1}/{run.num_epochs}', leave=False,
              disable=not (cfg.progress and ctx.is_primary)) as progress:
        metrics = {'train': train_one_epoch(run, epoch, progress if not progress.disable else None)}
    if ctx.distributed:
        distribute_bn(run.model, ctx.world_size, reduce=True)
    for key, model in (('eval', unwrap_model(run.model)), ('ema', run.ema and run.ema.module)):
        metrics[key] = evaluate(model, run.val_loader, ctx, run.autocast, cfg.channels_last, cfg.progress) \
            if run.val_loader is not None and model is not None else {}
    chosen = metrics['ema'] or metrics['eval']
    run.scheduler.step(epoch + 1, chosen.get(cfg.eval_metric))
    rng = [capture_rng_state()] * ctx.world_size
    if ctx.distributed:  # every process's random-number states, for the primary's checkpoint
        dist.all_gather_object(rng, rng[0])
    if saver is None:
        return metrics
    row = {'epoch': epoch + 1, **{f'train_{k}': v for k, v in metrics['train'].items() if k != 'lr'},
           **{f'eval_{m}': v for m, v in metrics['eval'].items()},
           **{f'eval_ema_{m}': v for m, v in metrics['ema'].items()}, 'lr': metrics['train']['lr']}
    rewrite_csv(os.path.join(saver.checkpoint_dir, 'summary.csv'), add=row)
    _logger.info('epoch %d/%d: %s', epoch + 1, run.num_epochs, ', '.join(f'{k} {v:.4g}' for k, v in row.items()))
    saver.save_epoch({
        'arch': cfg.model, 'epoch': epoch + 1, 'num_updates': run.num_updates,
        'state_dict': unwrap_model(run.model).state_dict(),
        'state_dict_ema': run.ema.module.state_dict() if run.ema is not None else None,
        'optimizer': run.optimizer.state_dict(), 'scheduler': run.scheduler.state_dict(),
        **({'amp_scaler': run.loss_scaler.state_dict()} if run.loss_scaler is not None else {}),
        'rng': rng, 'config': dict(vars(cfg)), 'num_classes': run.num_classes, 'class_to_idx': run.class_to_idx,
        'metrics': metrics, 'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in
                                            run.data_config.items()},
    }, chosen.get(cfg.eval_metric))
    return metrics
