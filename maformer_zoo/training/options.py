"""The options of a training run and of a validation run, named as in timm's ``train.py`` / ``validate.py``.

A row is ``(name, default, help[, type or choices])``: ``--name-with-dashes`` on the command line, ``name:`` in a
recipe, ``cfg.name`` in code; ``TrainConfig(**values)`` is the defaults updated with ``values``.
"""
from .config import Settings

__all__ = ['TrainConfig', 'EvalConfig', 'RESUME_MAY_CHANGE']

# Fields a resumed run may change without --allow-changes: where things are and how the run is watched.
RESUME_MAY_CHANGE = ('data_dir', 'num_workers', 'pin_memory', 'device', 'dist_backend', 'dist_url', 'output',
                     'experiment', 'resume', 'allow_changes', 'stop_epoch', 'checkpoint_hist', 'log_interval',
                     'progress', 'pretrained', 'pretrained_file')

COMMON = [
    ('data_dir', '', 'dataset root; for folders: <root>/train/<class>/* and <root>/val/<class>/*'),
    ('dataset', '', "timm create_dataset name ('' = image folder, 'torch/cifar10', 'hfds/...')"),
    ('class_map', '', 'text file with one class folder name per line, fixing the label order'),
    ('input_img_mode', 'RGB', "PIL mode images are read in ('RGB', or 'L' for one channel)"),
    ('img_size', None, "square input size (overrides the model's pretrained_cfg)", int),
    ('input_size', None, 'input size C H W (overrides img_size)', [int]),
    ('in_chans', None, 'input channels of the model (default 3)', int),
    ('interpolation', '', "eval resize interpolation ('' = model's pretrained_cfg)"),
    ('mean', None, "normalisation mean (default: model's pretrained_cfg)", [float]),
    ('std', None, "normalisation std (default: model's pretrained_cfg)", [float]),
    ('crop_pct', None, "eval center-crop fraction (default: model's pretrained_cfg)", float),
    ('crop_mode', '', "eval crop mode: 'center', 'squash' or 'border' ('' = pretrained_cfg)"),
    ('num_workers', 4, 'data loading processes per process'),
    ('pin_memory', False, 'pin host memory for faster GPU copies'),
    ('model', 'resnet18_mscsa', 'timm model name (any registered name, hf-hub:..., local-dir:...)'),
    ('pretrained', False, "use the model's pretrained weights (Hub or timm cache)"),
    ('num_classes', None, "classes of the head (default: the data's / the checkpoint's)", int),
    ('model_kwargs', {}, 'extra keyword arguments for timm.create_model (YAML mapping)'),
    ('channels_last', False, 'channels-last memory format'),
    ('batch_size', 128, 'images per process per (micro-)step'),
    ('device', '', "'cuda', 'cpu', ... ('' = cuda if available)"),
    ('amp', False, 'automatic mixed precision'),
    ('amp_dtype', 'float16', "'float16' (with loss scaling when training) or 'bfloat16'", ('float16', 'bfloat16')),
    ('progress', True, 'tqdm progress bars'),
]

TRAIN = [
    ('train_split', 'train', 'training split (sub-folder name for image folders)'),
    ('val_split', 'validation', "validation split ('' = no validation)"),
    ('pretrained_file', '', 'start from a weight file (.safetensors or a checkpoint; wins over pretrained)'),
    ('drop_rate', 0.0, 'dropout before the classifier'),
    ('drop_path_rate', None, "stochastic depth rate (default: the model's own)", float),
    ('grad_checkpointing', False, 'activation checkpointing (less memory, ~30%% slower)'),
    # optimiser (timm.optim.create_optimizer_v2)
    ('opt', 'adamw', 'optimizer name known to timm.optim.create_optimizer_v2'),
    ('lr', 1e-3, 'peak learning rate (for lr_base_batch_size images per step, if set)'),
    ('lr_base_batch_size', None, 'if set, lr is scaled linearly by global batch / this (papers: 1024)', int),
    ('weight_decay', 0.05, 'decoupled weight decay'),
    ('momentum', 0.9, 'SGD / RMSProp momentum'),
    ('opt_eps', None, 'optimizer epsilon', float),
    ('opt_betas', None, 'Adam betas', [float]),
    ('layer_decay', None, 'layer-wise learning-rate decay (fine-tuning)', float),
    ('clip_grad', None, 'gradient clipping threshold', float),
    ('clip_mode', 'norm', "'norm', 'value' or 'agc'"),
    ('grad_accum_steps', 1, 'micro-steps per optimizer step'),
    # schedule (timm.scheduler.create_scheduler_v2)
    ('sched', 'cosine', "'cosine', 'step', 'multistep', 'plateau', 'poly', 'tanh'"),
    ('epochs', 300, 'total epochs of the schedule'),
    ('stop_epoch', None, 'stop after this many epochs (split a run into jobs)', int),
    ('warmup_epochs', 5, 'linear warm-up epochs'),
    ('warmup_lr', 1e-6, 'learning rate at the start of warm-up'),
    ('min_lr', 1e-5, 'floor of the decay'),
    ('cooldown_epochs', 0, 'epochs at min_lr after the schedule'),
    ('decay_epochs', 90.0, "period of 'step' decay"),
    ('decay_milestones', [90, 180, 270], "epochs of 'multistep' decay"),
    ('decay_rate', 0.1, "factor of 'step' / 'multistep' decay"),
    ('sched_on_updates', True, 'update the lr every optimizer step, not every epoch'),
    # augmentation (timm.data.create_transform, Mixup, RandomErasing)
    ('augment', True, 'random train augmentation (--no-augment: resize + center crop only)'),
    ('scale', [0.08, 1.0], 'RandomResizedCrop area range'),
    ('ratio', [3. / 4., 4. / 3.], 'RandomResizedCrop aspect range'),
    ('hflip', 0.5, 'horizontal flip probability'),
    ('vflip', 0.0, 'vertical flip probability'),
    ('color_jitter', 0.4, 'color jitter strength (ignored when aa is set)'),
    ('aa', None, "timm auto-augment string, e.g. 'rand-m9-mstd0.5-inc1' or 'original'", str),
    ('train_interpolation', 'random', "train resize interpolation ('random' picks per image)"),
    ('reprob', 0.0, 'random erasing probability'),
    ('remode', 'pixel', 'random erasing fill mode'),
    ('recount', 1, 'random erasing regions'),
    ('aug_repeats', 0.0, 'repeated augmentation: copies of each image per epoch (0 = off)'),
    ('mixup', 0.0, 'mixup alpha (0 = off)'),
    ('cutmix', 0.0, 'cutmix alpha (0 = off)'),
    ('cutmix_minmax', None, 'cutmix box ratio range (overrides cutmix alpha)', [float]),
    ('mixup_prob', 1.0, 'probability of mixing a batch'),
    ('mixup_switch_prob', 0.5, 'probability of cutmix instead of mixup when both are on'),
    ('mixup_mode', 'batch', "'batch', 'pair' or 'elem'"),
    ('mixup_off_epoch', 0, 'turn mixing off from this epoch (0 = never)'),
    ('smoothing', 0.1, 'label smoothing'),
    ('bce_loss', False, 'binary cross-entropy instead of softmax cross-entropy'),
    # EMA (timm.utils.ModelEmaV3)
    ('model_ema', False, 'keep an exponential moving average of the weights'),
    ('model_ema_decay', 0.9998, 'EMA decay per optimizer step'),
    ('model_ema_warmup', False, 'EMA decay warm-up'),
    # runtime
    ('dist_backend', None, 'torch.distributed backend (default: nccl on cuda, gloo on cpu)', str),
    ('dist_url', 'env://', 'torch.distributed init method'),
    ('seed', 42, 'seed: data order is a function of (seed, epoch), model init of seed'),
    ('output', 'output/train', 'parent folder of run folders'),
    ('experiment', '', "run folder name ('' = <model>-<date>)"),
    ('resume', '', "checkpoint to continue from exactly ('auto' = <run folder>/last.pth)"),
    ('allow_changes', False, 'let --resume change hyper-parameters (recorded in config_changes.yaml)'),
    ('checkpoint_hist', 1, 'checkpoint-N.pth files kept (the best by eval_metric) besides last.pth'),
    ('eval_metric', 'top1', 'metric that picks model_best', ('top1', 'top5', 'loss')),
    ('log_interval', 50, 'optimizer steps between log lines'),
]

EVAL = [
    ('checkpoint', '', 'weights to evaluate: .safetensors or a checkpoint of ours / timm'),
    ('use_ema', True, "use a checkpoint's EMA weights when it has them"),
    ('split', 'validation', 'split to evaluate'),
    ('results_file', '', 'write the metrics to this JSON file'),
    ('skip_bad_images', False, "leave out images that cannot be decoded (counted in 'skipped') instead of stopping"),
]


class TrainConfig(Settings):
    """The settings of a training run (``scripts/train_imagenet.py``)."""
    OPTIONS = COMMON + TRAIN


class EvalConfig(Settings):
    """The settings of a validation run (``scripts/validate.py``)."""
    OPTIONS = [row if row[0] != 'batch_size' else ('batch_size', 256, 'images per batch') for row in COMMON] + EVAL
