"""timm's ``create_dataset``, ``create_transform`` and ``create_loader`` with what they lack
(docs/training.md#design-notes-choices-the-papers-leave-open, docs/training.md#image-decoding): image-folder
checks, our image decoder with undecodable images an error (or a counted skip), a training order that is a
function of ``(seed, epoch)`` for any number of processes, and disjoint validation shards.
"""
import logging
import os
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, default_collate
from timm.data import ImageDataset, create_dataset, create_loader, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.readers.img_extensions import get_img_extensions

from ..data.images import ImageDecodeError, decode_image

__all__ = ['DatasetError', 'is_folder_dataset', 'build_dataset', 'dataset_classes', 'build_train_loader',
           'build_eval_loader', 'CheckedLoader']
_logger = logging.getLogger(__name__)

# Folder names accepted for each split, first match wins (ImageNet uses train/ and val/).
SPLIT_FOLDERS = {'train': ('train', 'training'), 'validation': ('val', 'validation', 'valid'),
                 'test': ('test', 'testing')}


class DatasetError(ValueError):
    """A dataset that is missing or laid out so that training would go wrong."""


def is_folder_dataset(name: str) -> bool:
    return not name or name.lower().startswith('folder/')


def _split_folder(root: str, split: str, class_map: Optional[Dict[str, int]]) -> str:
    """``root``'s folder of ``split``, checked: class folders that all hold images and, given a class map, are in it."""
    if not os.path.isdir(root):
        raise DatasetError(
            f"Data folder '{root}' does not exist. Expected an image folder laid out as {root}/train/<class name>/"
            f"<image files> and {root}/val/<class name>/<image files>. Set --data-dir to that root (or --dataset for a "
            "timm dataset such as torch/cifar10).")
    names = SPLIT_FOLDERS.get(split, (split,))
    folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
        raise DatasetError(f"No '{split}' folder in '{root}' (looked for: {', '.join(names)}). Found: "
                           f"{sorted(os.listdir(root))[:10]}. Create it, or pass --train-split / --val-split "
                           "(--val-split '' trains without validation).")
    extensions = tuple(get_img_extensions())
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise DatasetError(f"'{folder}' has no class folders. Put the images of each class in their own sub-folder: "
                           f"{folder}/<class name>/<image files>.")
    empty = [c for c in classes if not any(f.lower().endswith(extensions) for _, _, files in
                                           os.walk(os.path.join(folder, c)) for f in files)]
    if empty:
        raise DatasetError(f"Class folder(s) without images in '{folder}': {', '.join(empty)}. An empty class would "
                           f"shift every later label. Add images ({', '.join(extensions)}) or remove the folder(s).")
    unknown = [c for c in classes if class_map and c not in class_map]
    if unknown:
        raise DatasetError(f"Class folder(s) {unknown} in '{folder}' are not among the training classes "
                           f"({len(class_map)}: {list(class_map)[:10]}...). Use the same class folders in every split.")
    return folder


class _BadSample(NamedTuple):
    """What the dataset returns for an image it cannot decode; the loader decides in the main process."""
    path: str
    reason: str


def _checked_collate(samples: List[Any]):
    good = [s for s in samples if not isinstance(s, _BadSample)]
    return default_collate(good) if good else None, [s for s in samples if isinstance(s, _BadSample)]


class DecodedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` (its readers, transforms, targets) with our decoder and no silent retry."""

    def __getitem__(self, index: int):
        handle, target, *features = self.reader[index]
        name = self.reader.filename(index, absolute=True)
        try:
            img = decode_image(handle, mode=self.input_img_mode or 'RGB', name=name)
        except ImageDecodeError as err:
            return _BadSample(name, str(err))
        finally:
            if hasattr(handle, 'close'):
                handle.close()
        img = self.transform(img) if self.transform is not None else img
        target = -1 if target is None else (self.target_transform(target) if self.target_transform else target)
        return (img, target) if self.additional_features is None else (img, target, *features)


class CheckedLoader:
    """The batches of a ``_checked_collate`` loader: an undecodable image raises :class:`DatasetError` naming
    it or, with ``skip_bad``, is left out and its path recorded in ``skipped``."""

    def __init__(self, loader: DataLoader, skip_bad: bool = False, hint: str = ''):
        self.loader, self.sampler, self.skip_bad, self.hint = loader, loader.sampler, skip_bad, hint
        self.skipped: List[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, bad in self.loader:
            for sample in bad:
                if not self.skip_bad:
                    raise DatasetError(sample.reason + self.hint)
                _logger.warning(f'Skipped {sample.path}: {sample.reason}')
                self.skipped.append(sample.path)
            if batch is not None:
                yield batch


def build_dataset(name: str, root: str, split: str, is_training: bool, class_map: Optional[Any] = None,
                  input_img_mode: str = 'RGB', seed: int = 42, batch_size: int = 1) -> torch.utils.data.Dataset:
    """``timm.data.create_dataset`` with the checks above; ``class_map``: a dict, a class-list file or None."""
    if isinstance(class_map, str) and class_map:
        with open(class_map) as f:
            class_map = {n: i for i, n in enumerate(line.strip() for line in f if line.strip())}
    kwargs = dict(class_map=class_map or None, is_training=is_training, input_img_mode=input_img_mode)
    if is_folder_dataset(name) and not os.path.isfile(root):  # a file root is a tar archive: timm reads it
        dataset = create_dataset(name, root=_split_folder(root, split, class_map), search_split=False, **kwargs)
    else:
        dataset = create_dataset(name, root=root, split=split, seed=seed, batch_size=batch_size, **kwargs)
    if type(dataset) is ImageDataset and not dataset.load_bytes:  # timm's file readers: decode with ours
        dataset = DecodedImageDataset(None, reader=dataset.reader, input_img_mode=input_img_mode,
                                      additional_features=dataset.additional_features)
    return dataset


def dataset_classes(dataset: torch.utils.data.Dataset) -> Optional[Dict[str, int]]:
    """The class-name -> index map of a timm or torchvision dataset, when it has one."""
    mapping = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    classes = getattr(dataset, 'classes', None)
    return dict(mapping) if mapping else ({str(c): i for i, c in enumerate(classes)} if classes else None)


def build_train_loader(dataset, data_config: Dict[str, Any], cfg: Any, world_size: int, rank: int) -> CheckedLoader:
    """timm's train transform with our sampler: timm's ``create_loader`` takes its sampler from
    ``torch.distributed`` (another order for one process, no repeated augmentation without a process group).
    Workers start afresh each epoch, seeded from the main process's (checkpointed) torch RNG."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DatasetError('Iterable (streaming) datasets cannot be resumed exactly; use a map-style dataset.')
    dataset.transform = create_transform(
        data_config['input_size'], is_training=True, no_aug=not cfg.augment, scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation, mean=data_config['mean'], std=data_config['std'], re_prob=cfg.reprob,
        re_mode=cfg.remode, re_count=cfg.recount)
    if cfg.aug_repeats:
        sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=cfg.aug_repeats)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=cfg.seed, drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise DatasetError(f"The training split has {len(dataset)} images, {len(sampler)} per process: fewer than "
                           f"one batch of {cfg.batch_size}. Lower --batch-size.")
    return CheckedLoader(DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                                    pin_memory=cfg.pin_memory, drop_last=True, collate_fn=_checked_collate,
                                    worker_init_fn=_seed_numpy))


def _seed_numpy(worker_id: int) -> None:  # torch seeds `random` and torch per worker; NumPy would repeat
    np.random.seed(torch.initial_seed() % 2 ** 32)


class _Shard(Subset):
    """Images ``rank, rank + N, ...``; ``transform`` is the dataset's (``create_loader`` sets it)."""
    transform = property(lambda self: self.dataset.transform,
                         lambda self, value: setattr(self.dataset, 'transform', value))


def build_eval_loader(dataset, data_config: Dict[str, Any], batch_size: int, num_workers: int, world_size: int = 1,
                      rank: int = 0, pin_memory: bool = False, skip_bad: bool = False) -> CheckedLoader:
    """timm's ``create_loader`` (eval transform, in order) over this process's shard."""
    shard = _Shard(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    loader = create_loader(
        shard, data_config['input_size'], batch_size, is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'), num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=_checked_collate, use_prefetcher=False, persistent_workers=False)
    return CheckedLoader(loader, skip_bad, '' if skip_bad else ' (validate.py --skip-bad-images leaves such images '
                                                              'out, counted.)')
