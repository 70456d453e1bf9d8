"""The training and evaluation loops, assembled from timm's components.

``timm.data`` (datasets, transforms, ``Mixup``), ``timm.optim.create_optimizer_v2``,
``timm.scheduler.create_scheduler_v2``, ``timm.utils.ModelEmaV3`` / ``NativeScaler`` /
``distribute_bn`` / ``update_summary``, ``timm.loss`` and PyTorch DDP do the work; this module wires
them together the way timm's ``train.py`` does, and adds exact resumption (see
:mod:`.checkpoint`), world-size-independent data order (see :mod:`.data`), a per-step CSV log and a
final summary.

Multi-GPU / multi-node: launch with ``torchrun``; the environment it sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) is read by timm's
``init_distributed_device_so``. ``batch_size`` is per process, so the global batch is
``batch_size * grad_accum_steps * world_size``.
"""
import contextlib
import csv
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import yaml
from timm.data import Mixup, resolve_data_config
from timm.data.loader import adapt_to_chs
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, distribute_bn, random_seed
from timm.utils import update_summary, unwrap_model
from timm.utils.distributed import init_distributed_device_so

from ..utils.atomic import write_atomic
from .checkpoint import (capture_rng_state, load_training_checkpoint, prune_checkpoints, restore_rng_state,
                         save_checkpoint)
from .config import ConfigError
from .run_folder import (check_resume_changes, check_run_folder, default_run_name, find_resumable_run, recover_best,
                         save_best, truncate_csv, write_json_atomic)
from .data import (
    DatasetError, build_dataset, build_eval_loader, build_train_loader, dataset_classes, is_folder_dataset)
from .modeling import check_model_name, create_model_for_run
from .options import RESUME_MAY_CHANGE, TrainConfig

__all__ = ['RunContext', 'setup_distributed', 'resolve_run_data_config', 'amp_context', 'train_one_epoch',
           'evaluate', 'train']

_logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Where this process runs and its place among the processes of the run."""
    device: torch.device
    distributed: bool = False
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = '', backend: Optional[str] = None, url: str = 'env://') -> RunContext:
    """Join the process group when launched by torchrun (timm's ``init_distributed_device_so``)."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    info = init_distributed_device_so(device=device, dist_backend=backend, dist_url=url)
    return RunContext(torch.device(info['device']), info['distributed'], info['world_size'],
                      info['global_rank'], info['local_rank'])


def resolve_run_data_config(cfg: Any, model: nn.Module) -> Dict[str, Any]:
    """timm's data config (input size, crop_pct, interpolation, mean/std) with ``cfg`` overrides."""
    args = {k: getattr(cfg, k) for k in ('interpolation', 'mean', 'std', 'crop_pct', 'crop_mode', 'img_size')}
    in_chans = getattr(model, 'in_chans', None) or cfg.in_chans or 3
    args['in_chans'] = in_chans
    if cfg.input_size:
        args['input_size'] = tuple(cfg.input_size)
    data_config = resolve_data_config(args, model=model)
    if data_config['input_size'][0] != in_chans:  # pretrained_cfg assumes 3 channels
        data_config['input_size'] = (in_chans, *data_config['input_size'][1:])
    data_config['mean'] = adapt_to_chs(data_config['mean'], in_chans)
    data_config['std'] = adapt_to_chs(data_config['std'], in_chans)
    return data_config


def amp_context(device: torch.device, enabled: bool, dtype: str) -> Callable[[], Any]:
    """A factory of autocast contexts (or null contexts when AMP is off)."""
    if not enabled:
        return contextlib.nullcontext
    if dtype not in ('float16', 'bfloat16'):
        raise ConfigError(f"amp_dtype must be 'float16' or 'bfloat16', not {dtype!r}.")
    return partial(torch.autocast, device_type=device.type, dtype=getattr(torch, dtype))


def _train_loss(cfg: TrainConfig, mixing: bool) -> nn.Module:
    if cfg.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else cfg.smoothing)
    if mixing:  # Mixup applies the label smoothing to its soft targets
        return SoftTargetCrossEntropy()
    if cfg.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def train_one_epoch(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        cfg: TrainConfig,
        ctx: RunContext,
        epoch: int,
        num_updates: int,
        scheduler: Any,
        autocast: Callable[[], Any],
        loss_scaler: Optional[NativeScaler] = None,
        ema: Optional[ModelEmaV3] = None,
        mixup_fn: Optional[Mixup] = None,
        step_log: Optional[Callable[[Dict[str, Any]], None]] = None,
        progress: Optional[Any] = None,
):
    """One epoch of optimizer steps; returns ``(metrics, num_updates)``.

    A step averages ``grad_accum_steps`` micro-batches (fewer for the remainder at the end of the
    epoch, as timm does); DDP synchronises gradients only on the last micro-batch of a step.
    """
    model.train()
    accum = cfg.grad_accum_steps
    num_batches = len(loader)
    last_window_start = num_batches - (num_batches % accum or accum)
    clip_params = list(unwrap_model(model).parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    seen = torch.zeros((), dtype=torch.float64, device=ctx.device)
    window_loss = 0.0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for index, (images, targets) in enumerate(loader):
        need_update = index == num_batches - 1 or (index + 1) % accum == 0
        window = accum if index < last_window_start else num_batches - last_window_start
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        no_sync = model.no_sync if ctx.distributed and not need_update else contextlib.nullcontext
        with no_sync():
            with autocast():
                loss = loss_fn(model(images), targets)
            if loss_scaler is not None:
                loss_scaler(loss / window, optimizer, clip_grad=cfg.clip_grad, clip_mode=cfg.clip_mode,
                            parameters=clip_params, need_update=need_update)
            else:
                (loss / window).backward()
                if need_update:
                    if cfg.clip_grad:
                        dispatch_clip_grad(clip_params, cfg.clip_grad, mode=cfg.clip_mode)
                    optimizer.step()
        loss = loss.detach().float()
        loss_sum += loss * images.size(0)
        seen += images.size(0)
        window_loss += loss.item() / window
        if not need_update:
            continue
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if ema is not None:
            ema.update(unwrap_model(model), step=num_updates)
        scheduler.step_update(num_updates=num_updates)
        lr = optimizer.param_groups[0]['lr']
        if step_log is not None:
            step_log({'epoch': epoch, 'step': num_updates, 'loss': window_loss, 'lr': lr})
        if progress is not None:
            progress.set_postfix(loss=f'{window_loss:.4f}', lr=f'{lr:.3g}', refresh=False)
            progress.update(1)
        elif ctx.is_primary and cfg.log_interval and num_updates % cfg.log_interval == 0:
            _logger.info('epoch %d step %d loss %.4f lr %.3g', epoch, num_updates, window_loss, lr)
        window_loss = 0.0
    if ctx.distributed:
        totals = torch.stack([loss_sum, seen])
        dist.all_reduce(totals)
        loss_sum, seen = totals[0], totals[1]
    elapsed = time.perf_counter() - start
    metrics = {'loss': (loss_sum / seen.clamp(min=1)).item(), 'img_per_s': seen.item() / max(elapsed, 1e-9),
               'lr': optimizer.param_groups[0]['lr']}
    return metrics, num_updates


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        ctx: RunContext,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        channels_last: bool = False,
        progress: bool = False,
) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (in %) over the loader; summed over all processes."""
    from tqdm import tqdm
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, images
    batches = tqdm(loader, desc='eval', leave=False, disable=not (progress and ctx.is_primary))
    for images, targets in batches:
        images = images.to(ctx.device, non_blocking=True)
        targets = targets.to(ctx.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        n = targets.size(0)
        top1, top5 = accuracy(logits, targets, topk=(1, 5))
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum').double(),
            top1.double() * n / 100.0, top5.double() * n / 100.0,
            torch.tensor(float(n), dtype=torch.float64, device=ctx.device)])
    if ctx.distributed:
        dist.all_reduce(totals)
    count = max(totals[3].item(), 1.0)
    return {'loss': totals[0].item() / count, 'top1': 100.0 * round(totals[1].item()) / count,
            'top5': 100.0 * round(totals[2].item()) / count, 'count': int(totals[3].item())}


class _CsvAppender:
    def __init__(self, path: str, fields):
        self.path, self.fields = path, list(fields)

    def __call__(self, row: Dict[str, Any]) -> None:
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _run_dir(cfg: TrainConfig, ctx: RunContext) -> str:
    """``<output>/<experiment>``; without one, the run ``--resume auto`` continues, else a new dated folder."""
    if cfg.experiment:
        return os.path.join(cfg.output, cfg.experiment)
    found = find_resumable_run(cfg.output, cfg.model) if cfg.resume == 'auto' else None
    run_dir = [found or os.path.join(cfg.output, default_run_name(cfg.model, time.strftime('%Y%m%d-%H%M%S')))]
    if ctx.distributed:  # one folder for all processes, whatever their clocks say
        dist.broadcast_object_list(run_dir, src=0)
    return run_dir[0]


def _resume_file(cfg: TrainConfig, run_dir: str) -> str:
    """The checkpoint this run continues ('' for a new run), once ``run_dir`` may be written (run_folder)."""
    if cfg.resume == 'auto':  # continue the run folder's last checkpoint if there is one (preemptible jobs)
        check_run_folder(run_dir, f"Run folder '{run_dir}'", resuming=True)
        last = os.path.join(run_dir, 'last.pth')
        return last if os.path.isfile(last) else ''
    same_run = bool(cfg.resume) and os.path.realpath(os.path.dirname(os.path.abspath(cfg.resume))) == \
        os.path.realpath(run_dir)
    check_run_folder(run_dir, f"Run folder '{run_dir}'", resuming=same_run,
                     hint='continue it with --resume auto, or choose another --experiment'
                          + (f" for a new run from '{cfg.resume}'" if cfg.resume else ''))
    return cfg.resume


def _saved_config(cfg: TrainConfig, run_dir: str, checkpoint: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The settings the resumed run last ran with: its checkpoint's, or before any checkpoint its config.yaml."""
    if checkpoint is not None:
        return checkpoint.get('config') or {}
    path = os.path.join(run_dir, 'config.yaml')
    if cfg.resume != 'auto' or not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        saved = yaml.safe_load(f)
    return saved if isinstance(saved, dict) else {}


def _metric_better(metric: str, new: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return new < best if metric == 'loss' else new > best


def _export_weights(path: str, state_dict: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    from safetensors.torch import save
    write_atomic(path, save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, metadata))


def _gather_rng_states(ctx: RunContext):
    state = capture_rng_state()
    if not ctx.distributed:
        return [state]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as configured; returns the final summary (on every process)."""
    ctx = setup_distributed(cfg.device, cfg.dist_backend, cfg.dist_url)
    try:
        return _train(cfg, ctx)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: RunContext) -> Dict[str, Any]:
    if cfg.grad_accum_steps < 1:
        raise ConfigError('grad_accum_steps must be >= 1.')
    if cfg.eval_metric not in ('top1', 'top5', 'loss'):
        raise ConfigError(f"eval_metric must be 'top1', 'top5' or 'loss', not {cfg.eval_metric!r}.")
    check_model_name(cfg.model)  # before the (possibly slow) dataset scan
    run_dir = _run_dir(cfg, ctx)
    resume = _resume_file(cfg, run_dir)  # the run-folder rule, checked before anything is written
    checkpoint = load_training_checkpoint(resume) if resume else None
    saved_config = _saved_config(cfg, run_dir, checkpoint)
    check_resume_changes(saved_config, dataclasses.asdict(cfg), RESUME_MAY_CHANGE, cfg.allow_changes, run_dir,
                         f"epoch {checkpoint['epoch'] if checkpoint else 0}", record=False)

    train_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.train_split, is_training=True,
                              class_map=cfg.class_map, input_img_mode=cfg.input_img_mode,
                              seed=cfg.seed, batch_size=cfg.batch_size)
    class_to_idx = dataset_classes(train_set)
    val_set = None
    if cfg.val_split:
        val_set = build_dataset(cfg.dataset, cfg.data_dir, cfg.val_split, is_training=False,
                                class_map=class_to_idx if is_folder_dataset(cfg.dataset) else cfg.class_map,
                                input_img_mode=cfg.input_img_mode, seed=cfg.seed, batch_size=cfg.batch_size)
    num_classes = cfg.num_classes or (max(class_to_idx.values()) + 1 if class_to_idx else None)
    if num_classes is None:
        raise DatasetError(f"Cannot tell the number of classes of dataset '{cfg.dataset}': set --num-classes.")
    if class_to_idx and max(class_to_idx.values()) >= num_classes:
        raise ConfigError(f'num_classes={num_classes} but the data has {len(class_to_idx)} classes.')

    # Same initial weights on every process (DDP would broadcast rank 0's anyway).
    random_seed(cfg.seed, 0)
    in_chans = cfg.in_chans or (1 if cfg.input_img_mode == 'L' else None)
    model = create_model_for_run(
        cfg.model, num_classes=num_classes, in_chans=in_chans,
        pretrained=cfg.pretrained and checkpoint is None and not cfg.pretrained_file,  # a given file wins
        weights_file=cfg.pretrained_file if checkpoint is None else '',
        drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate, **cfg.model_kwargs)
    if cfg.grad_checkpointing:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise ConfigError(f"Model '{cfg.model}' does not support gradient checkpointing.")
        model.set_grad_checkpointing(True)
    model.to(ctx.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_run_data_config(dataclasses.replace(cfg, in_chans=in_chans), model)
    # Augmentation randomness differs per process (seed + rank), as in timm.
    random_seed(cfg.seed, ctx.rank)

    train_loader = build_train_loader(train_set, data_config, cfg, ctx.world_size, ctx.rank)
    val_loader = None
    if val_set is not None:
        val_loader = build_eval_loader(val_set, data_config, cfg.batch_size, cfg.num_workers,
                                       ctx.world_size, ctx.rank, cfg.pin_memory)

    global_batch = cfg.batch_size * cfg.grad_accum_steps * ctx.world_size
    lr = cfg.lr * global_batch / cfg.lr_base_batch_size if cfg.lr_base_batch_size else cfg.lr
    opt_kwargs = {}
    if cfg.opt_eps is not None:
        opt_kwargs['eps'] = cfg.opt_eps
    if cfg.opt_betas is not None:
        opt_kwargs['betas'] = tuple(cfg.opt_betas)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, layer_decay=cfg.layer_decay, **opt_kwargs)
    autocast = amp_context(ctx.device, cfg.amp, cfg.amp_dtype)
    loss_scaler = NativeScaler(device=ctx.device.type) if cfg.amp and cfg.amp_dtype == 'float16' else None
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup) if cfg.model_ema else None

    updates_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=cfg.decay_milestones, cooldown_epochs=cfg.cooldown_epochs, decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
        plateau_mode='min' if cfg.eval_metric == 'loss' else 'max',
        step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=updates_per_epoch)

    start_epoch, num_updates, best_metric, best_epoch = 0, 0, None, None
    rng_state = None
    if checkpoint is not None:
        if checkpoint.get('arch') != cfg.model:
            raise ConfigError(f"Checkpoint '{resume}' is of model '{checkpoint.get('arch')}', not '{cfg.model}'.")
        model.load_state_dict(checkpoint['state_dict'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        if loss_scaler is not None and checkpoint.get('amp_scaler'):
            loss_scaler.load_state_dict(checkpoint['amp_scaler'])
        if ema is not None and checkpoint.get('state_dict_ema') is not None:
            ema.module.load_state_dict(checkpoint['state_dict_ema'])
        start_epoch, num_updates = checkpoint['epoch'], checkpoint['num_updates']
        best_metric, best_epoch = checkpoint.get('best_metric'), checkpoint.get('best_epoch')
        states = checkpoint.get('rng') or []
        if len(states) == ctx.world_size:
            rng_state = states[ctx.rank]
        elif ctx.is_primary:
            _logger.warning('Checkpoint was written by %d processes, this run has %d: data order is the same, '
                            'augmentation randomness is not.', len(states), ctx.world_size)
        if ctx.is_primary:
            _logger.info("Resumed '%s' after epoch %d (%d optimizer steps)", resume, start_epoch, num_updates)

    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                         prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                         label_smoothing=cfg.smoothing, num_classes=num_classes)
    train_loss_fn = _train_loss(cfg, mixing=mixup_fn is not None).to(ctx.device)

    summary_csv = os.path.join(run_dir, 'summary.csv')
    step_log = None
    if ctx.is_primary:
        os.makedirs(run_dir, exist_ok=True)
        # rows past the checkpoint were logged by the interrupted process; they are logged again below
        truncate_csv(summary_csv, lambda row: int(row['epoch']) <= start_epoch)
        truncate_csv(os.path.join(run_dir, 'train_steps.csv'), lambda row: int(row['step']) <= num_updates)
        if checkpoint is not None:
            recover_best(run_dir, best_epoch, lambda state: save_best(run_dir, state, _export_weights))
        check_resume_changes(saved_config, dataclasses.asdict(cfg), RESUME_MAY_CHANGE, cfg.allow_changes, run_dir,
                             f"epoch {start_epoch}")
        if not os.path.isfile(os.path.join(run_dir, 'config.yaml')):  # the run's settings as it started
            write_atomic(os.path.join(run_dir, 'config.yaml'), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        step_log = _CsvAppender(os.path.join(run_dir, 'train_steps.csv'), ['epoch', 'step', 'loss', 'lr'])
        _logger.info('%s: %.2fM params, %d classes, input %s, global batch %d, lr %.3g, %d steps/epoch, '
                     '%d processes', cfg.model, sum(p.numel() for p in model.parameters()) / 1e6, num_classes,
                     data_config['input_size'], global_batch, lr, updates_per_epoch, ctx.world_size)

    if start_epoch > 0:  # each call acts only in its own mode (per-epoch or per-update)
        scheduler.step(start_epoch)
        scheduler.step_update(num_updates)
    if rng_state is not None:  # last, so that nothing above consumes the restored streams
        restore_rng_state(rng_state)

    from tqdm import tqdm
    train_sampler = train_loader.sampler
    eval_metrics, ema_metrics, train_metrics = {}, {}, {}
    started = time.perf_counter()
    last_epoch = start_epoch
    for epoch in range(start_epoch, num_epochs):
        if cfg.stop_epoch is not None and epoch >= cfg.stop_epoch:
            break
        train_sampler.set_epoch(epoch)
        if mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        progress = tqdm(total=updates_per_epoch, desc=f'epoch {epoch + 1}/{num_epochs}',
                        disable=not (cfg.progress and ctx.is_primary), leave=False)
        train_metrics, num_updates = train_one_epoch(
            model, train_loader, optimizer, train_loss_fn, cfg, ctx, epoch, num_updates, scheduler, autocast,
            loss_scaler=loss_scaler, ema=ema, mixup_fn=mixup_fn, step_log=step_log,
            progress=progress if not progress.disable else None)
        progress.close()
        if ctx.distributed:
            distribute_bn(model, ctx.world_size, reduce=True)
        if val_loader is not None:
            eval_metrics = evaluate(unwrap_model(model), val_loader, ctx, autocast, cfg.channels_last, cfg.progress)
            if ema is not None:
                ema_metrics = evaluate(ema.module, val_loader, ctx, autocast, cfg.channels_last, cfg.progress)
        chosen = ema_metrics or eval_metrics
        scheduler.step(epoch + 1, chosen.get(cfg.eval_metric) if chosen else None)
        last_epoch = epoch + 1
        is_best = bool(chosen) and _metric_better(cfg.eval_metric, chosen[cfg.eval_metric], best_metric)
        if is_best:
            best_metric, best_epoch = chosen[cfg.eval_metric], last_epoch
        rng_states = _gather_rng_states(ctx)
        if not ctx.is_primary:
            continue
        row_eval = dict(eval_metrics)
        row_eval.update({f'ema_{k}': v for k, v in ema_metrics.items()})
        update_summary(last_epoch, {k: v for k, v in train_metrics.items() if k != 'lr'}, row_eval,
                       summary_csv, lr=train_metrics['lr'])
        _logger.info('epoch %d/%d: train loss %.4f (%.1f img/s)%s', last_epoch, num_epochs, train_metrics['loss'],
                     train_metrics['img_per_s'],
                     ''.join(f", {'EMA ' if m is ema_metrics else ''}val top1 {m['top1']:.2f} top5 {m['top5']:.2f} "
                             f"loss {m['loss']:.4f}" for m in (eval_metrics, ema_metrics) if m))
        state = {
            'arch': cfg.model, 'epoch': last_epoch, 'num_updates': num_updates,
            'state_dict': unwrap_model(model).state_dict(),
            'state_dict_ema': ema.module.state_dict() if ema is not None else None,
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
            'amp_scaler': loss_scaler.state_dict() if loss_scaler is not None else None,
            'rng': rng_states, 'config': dataclasses.asdict(cfg), 'num_classes': num_classes,
            'class_to_idx': class_to_idx, 'data_config': {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in data_config.items()},
            'metrics': {'train': train_metrics, 'eval': eval_metrics, 'ema': ema_metrics},
            'best_metric': best_metric, 'best_epoch': best_epoch,
        }
        if is_best or not chosen:  # before last.pth, which records best_epoch (see run_folder)
            save_best(run_dir, state, _export_weights)
        if cfg.checkpoint_hist > 0:
            save_checkpoint(os.path.join(run_dir, f'checkpoint-{last_epoch}.pth'), state)
            prune_checkpoints(run_dir, cfg.checkpoint_hist)
        save_checkpoint(os.path.join(run_dir, 'last.pth'), state)

    summary = {
        'model': cfg.model, 'run_dir': run_dir, 'epochs_done': last_epoch, 'epochs_total': num_epochs,
        'optimizer_steps': num_updates, 'global_batch': global_batch, 'lr': lr, 'world_size': ctx.world_size,
        'num_classes': num_classes, 'train': train_metrics, 'eval': eval_metrics, 'ema_eval': ema_metrics,
        'best_metric': best_metric, 'best_epoch': best_epoch, 'eval_metric': cfg.eval_metric,
        'seconds': time.perf_counter() - started,
    }
    if ctx.is_primary:
        write_json_atomic(os.path.join(run_dir, 'summary.json'), summary)
        _logger.info('Done: %s', _format_summary(summary))
    return summary


def _format_summary(summary: Dict[str, Any]) -> str:
    parts = [f"{summary['epochs_done']}/{summary['epochs_total']} epochs, {summary['optimizer_steps']} steps, "
             f"{summary['seconds']:.0f} s"]
    if summary['eval']:
        parts.append(f"last val top1 {summary['eval']['top1']:.2f}")
    if summary['best_metric'] is not None:
        parts.append(f"best {summary['eval_metric']} {summary['best_metric']:.4g} (epoch {summary['best_epoch']})")
    parts.append(f"run folder {summary['run_dir']}")
    return '; '.join(parts)
