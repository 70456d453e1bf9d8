"""The fields of a training run and of a validation run; each is also a ``--field-name`` option.

Names follow timm's ``train.py`` / ``validate.py`` (``opt``, ``sched``, ``reprob``, ``aa``, ``smoothing``...).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ['TrainConfig', 'EvalConfig', 'RESUME_MAY_CHANGE']

# Fields a resumed run may change without --allow-changes: where things are and how the run is watched.
RESUME_MAY_CHANGE = ('data_dir', 'num_workers', 'pin_memory', 'device', 'dist_backend', 'dist_url', 'output',
                     'experiment', 'resume', 'allow_changes', 'stop_epoch', 'checkpoint_hist', 'log_interval',
                     'progress', 'pretrained', 'pretrained_file')


def _help(text: str, default: Any = None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={'help': text})
    return field(default=default, metadata={'help': text})


@dataclass
class CommonOptions:
    data_dir: str = _help('dataset root; for folders: <root>/train/<class>/* and <root>/val/<class>/*', '')
    dataset: str = _help("timm create_dataset name ('' = image folder, 'torch/cifar10', 'hfds/...')", '')
    class_map: str = _help('text file with one class folder name per line, fixing the label order', '')
    input_img_mode: str = _help("PIL mode images are read in ('RGB', or 'L' for one channel)", 'RGB')
    img_size: Optional[int] = _help("square input size (overrides the model's pretrained_cfg)", None)
    input_size: Optional[List[int]] = _help('input size C H W (overrides img_size)', None)
    in_chans: Optional[int] = _help('input channels of the model (default 3)', None)
    interpolation: str = _help("eval resize interpolation ('' = model's pretrained_cfg)", '')
    mean: Optional[List[float]] = _help("normalisation mean (default: model's pretrained_cfg)", None)
    std: Optional[List[float]] = _help("normalisation std (default: model's pretrained_cfg)", None)
    crop_pct: Optional[float] = _help("eval center-crop fraction (default: model's pretrained_cfg)", None)
    crop_mode: str = _help("eval crop mode: 'center', 'squash' or 'border' ('' = pretrained_cfg)", '')
    num_workers: int = _help('data loading processes per process', 4)
    pin_memory: bool = _help('pin host memory for faster GPU copies', False)
    model: str = _help('timm model name (any registered name, hf-hub:..., local-dir:...)', 'resnet18_mscsa')
    pretrained: bool = _help("use the model's pretrained weights (Hub or timm cache)", False)
    num_classes: Optional[int] = _help("classes of the head (default: the data's / the checkpoint's)", None)
    model_kwargs: Dict[str, Any] = _help('extra keyword arguments for timm.create_model', factory=dict)
    channels_last: bool = _help('channels-last memory format', False)
    batch_size: int = _help('images per process per (micro-)step', 128)
    device: str = _help("'cuda', 'cpu', ... ('' = cuda if available)", '')
    amp: bool = _help('automatic mixed precision', False)
    amp_dtype: str = _help("'float16' (with loss scaling when training) or 'bfloat16'", 'float16')
    progress: bool = _help('tqdm progress bars', True)


@dataclass
class TrainConfig(CommonOptions):
    train_split: str = _help('training split (sub-folder name for image folders)', 'train')
    val_split: str = _help("validation split ('' = no validation)", 'validation')
    pretrained_file: str = _help('start from a weight file (.safetensors or a checkpoint; wins over pretrained)', '')
    drop_rate: float = _help('dropout before the classifier', 0.0)
    drop_path_rate: Optional[float] = _help("stochastic depth rate (default: the model's own)", None)
    grad_checkpointing: bool = _help('activation checkpointing (less memory, ~30%% slower)', False)
    # optimiser (timm.optim.create_optimizer_v2)
    opt: str = _help('optimizer name known to timm.optim.create_optimizer_v2', 'adamw')
    lr: float = _help('peak learning rate (for lr_base_batch_size images per step, if set)', 1e-3)
    lr_base_batch_size: Optional[int] = _help(
        'if set, lr is scaled linearly by global batch / this (the papers quote lr at batch 1024)', None)
    weight_decay: float = _help('decoupled weight decay', 0.05)
    momentum: float = _help('SGD / RMSProp momentum', 0.9)
    opt_eps: Optional[float] = _help('optimizer epsilon', None)
    opt_betas: Optional[List[float]] = _help('Adam betas', None)
    layer_decay: Optional[float] = _help('layer-wise learning-rate decay (fine-tuning)', None)
    clip_grad: Optional[float] = _help('gradient clipping threshold', None)
    clip_mode: str = _help("'norm', 'value' or 'agc'", 'norm')
    grad_accum_steps: int = _help('micro-steps per optimizer step', 1)
    # schedule (timm.scheduler.create_scheduler_v2)
    sched: str = _help("'cosine', 'step', 'multistep', 'plateau', 'poly', 'tanh'", 'cosine')
    epochs: int = _help('total epochs of the schedule', 300)
    stop_epoch: Optional[int] = _help('stop after this many epochs (split a run into jobs)', None)
    warmup_epochs: int = _help('linear warm-up epochs', 5)
    warmup_lr: float = _help('learning rate at the start of warm-up', 1e-6)
    min_lr: float = _help('floor of the decay', 1e-5)
    cooldown_epochs: int = _help('epochs at min_lr after the schedule', 0)
    decay_epochs: float = _help("period of 'step' decay", 90)
    decay_milestones: List[int] = _help("epochs of 'multistep' decay", factory=lambda: [90, 180, 270])
    decay_rate: float = _help("factor of 'step' / 'multistep' decay", 0.1)
    sched_on_updates: bool = _help('update the lr every optimizer step, not every epoch', True)
    # augmentation (timm.data.create_transform, Mixup, RandomErasing)
    augment: bool = _help('random train augmentation (--no-augment: resize + center crop only)', True)
    scale: List[float] = _help('RandomResizedCrop area range', factory=lambda: [0.08, 1.0])
    ratio: List[float] = _help('RandomResizedCrop aspect range', factory=lambda: [3. / 4., 4. / 3.])
    hflip: float = _help('horizontal flip probability', 0.5)
    vflip: float = _help('vertical flip probability', 0.0)
    color_jitter: float = _help('color jitter strength (ignored when aa is set)', 0.4)
    aa: Optional[str] = _help("timm auto-augment string, e.g. 'rand-m9-mstd0.5-inc1' or 'original'", None)
    train_interpolation: str = _help("train resize interpolation ('random' picks per image)", 'random')
    reprob: float = _help('random erasing probability', 0.0)
    remode: str = _help('random erasing fill mode', 'pixel')
    recount: int = _help('random erasing regions', 1)
    aug_repeats: float = _help('repeated augmentation: copies of each image per epoch (0 = off)', 0)
    mixup: float = _help('mixup alpha (0 = off)', 0.0)
    cutmix: float = _help('cutmix alpha (0 = off)', 0.0)
    cutmix_minmax: Optional[List[float]] = _help('cutmix box ratio range (overrides cutmix alpha)', None)
    mixup_prob: float = _help('probability of mixing a batch', 1.0)
    mixup_switch_prob: float = _help('probability of cutmix instead of mixup when both are on', 0.5)
    mixup_mode: str = _help("'batch', 'pair' or 'elem'", 'batch')
    mixup_off_epoch: int = _help('turn mixing off from this epoch (0 = never)', 0)
    smoothing: float = _help('label smoothing', 0.1)
    bce_loss: bool = _help('binary cross-entropy instead of softmax cross-entropy', False)
    # EMA (timm.utils.ModelEmaV3)
    model_ema: bool = _help('keep an exponential moving average of the weights', False)
    model_ema_decay: float = _help('EMA decay per optimizer step', 0.9998)
    model_ema_warmup: bool = _help('EMA decay warm-up', False)
    # runtime
    dist_backend: Optional[str] = _help("torch.distributed backend (default: nccl on cuda, gloo on cpu)", None)
    dist_url: str = _help('torch.distributed init method', 'env://')
    seed: int = _help('seed: data order is a function of (seed, epoch), model init of seed', 42)
    output: str = _help('parent folder of run folders', 'output/train')
    experiment: str = _help("run folder name ('' = <model>-<date>)", '')
    resume: str = _help("checkpoint to continue from exactly ('auto' = <run folder>/last.pth)", '')
    allow_changes: bool = _help('let --resume change hyper-parameters (recorded in config_changes.yaml)', False)
    checkpoint_hist: int = _help('checkpoint-N.pth files kept (the best by eval_metric) besides last.pth', 1)
    eval_metric: str = _help("metric that picks model_best: 'top1', 'top5' or 'loss'", 'top1')
    log_interval: int = _help('optimizer steps between log lines', 50)


@dataclass
class EvalConfig(CommonOptions):
    checkpoint: str = _help('weights to evaluate: .safetensors or a checkpoint of ours / timm', '')
    use_ema: bool = _help("use a checkpoint's EMA weights when it has them", True)
    split: str = _help('split to evaluate', 'validation')
    batch_size: int = _help('images per batch', 256)
    results_file: str = _help('write the metrics to this JSON file', '')
    skip_bad_images: bool = _help("leave out images that cannot be decoded (counted in 'skipped') instead of stopping",
                                  False)
