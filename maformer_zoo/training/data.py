"""Datasets and loaders for training and validation, from timm's data components.

Datasets come from ``timm.data.create_dataset`` (image folders, tar files, ``torch/``, ``hfds/``...),
transforms from ``timm.data.create_transform``, samplers from torch / timm, batches from a plain
``torch.utils.data.DataLoader``. What this module adds:

* checks on image folders that turn silent mistakes into errors saying what to fix: a missing
  root or split folder, a class folder with no images (timm would just drop that class and shift
  every later label), validation classes that training does not have;
* validation reuses the training class-to-index map, so a validation folder missing a class still
  gets the training labels;
* data order is a function of ``(seed, epoch)`` only (``DistributedSampler`` with an explicit
  seed, also for one process; timm's ``RepeatAugSampler`` orders by epoch), so a resumed run
  replays the same batches, and a run on N processes sees, per step, the union of what one process
  with an N-times larger batch sees;
* validation on N processes splits the set into disjoint strided shards (no padding duplicates),
  so the reduced metrics are exactly those of one process;
* images decoded by :func:`maformer_zoo.data.decode_image`; an undecodable one is an error, not
  silently replaced by the next image as timm does (:class:`CheckedDataLoader`).
"""
import logging
import os
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset, default_collate
from timm.data import ImageDataset, create_dataset, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.readers.img_extensions import get_img_extensions

from ..data.images import ImageDecodeError, decode_image

__all__ = [
    'DatasetError', 'SPLIT_FOLDERS', 'is_folder_dataset', 'find_split_folder', 'check_image_folder', 'build_dataset',
    'dataset_classes', 'build_train_loader', 'build_eval_loader', 'DecodedImageDataset', 'CheckedDataLoader',
]
_logger = logging.getLogger(__name__)

# Folder names accepted for each split, first match wins (ImageNet uses train/ and val/).
SPLIT_FOLDERS = {
    'train': ('train', 'training'),
    'validation': ('val', 'validation', 'valid'),
    'test': ('test', 'testing'),
}


class DatasetError(ValueError):
    """A dataset that is missing or laid out so that training would go wrong."""


def is_folder_dataset(name: str) -> bool:
    return not name or name.lower().startswith('folder/')


def find_split_folder(root: str, split: str) -> str:
    """The folder of ``split`` under an image-folder ``root`` (``root/train``, ``root/val``...)."""
    if not os.path.isdir(root):
        raise DatasetError(
            f"Data folder '{root}' does not exist. Expected an image folder laid out as\n"
            f"  {root}/train/<class name>/<image files>\n  {root}/val/<class name>/<image files>\n"
            "Set --data-dir to that root (or --dataset for a timm dataset such as torch/cifar10).")
    names = SPLIT_FOLDERS.get(split, (split,))
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    raise DatasetError(
        f"No '{split}' folder in '{root}' (looked for: {', '.join(names)}). "
        f"Found: {sorted(os.listdir(root))[:10]}. Create it, or pass --train-split / --val-split "
        "(--val-split '' trains without validation).")


def check_image_folder(split_dir: str) -> List[str]:
    """Class folder names of ``split_dir``; every one must hold at least one image."""
    extensions = tuple(get_img_extensions())
    classes = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise DatasetError(
            f"'{split_dir}' has no class folders. Put the images of each class in their own "
            f"sub-folder: {split_dir}/<class name>/<image files>.")
    empty = []
    for name in classes:
        has_image = False
        for dirpath, _, files in os.walk(os.path.join(split_dir, name)):
            if any(f.lower().endswith(extensions) for f in files):
                has_image = True
                break
        if not has_image:
            empty.append(name)
    if empty:
        raise DatasetError(
            f"Class folder(s) without images in '{split_dir}': {', '.join(empty)}. An empty class would "
            f"shift every later label. Add images ({', '.join(extensions)}) or remove the folder(s).")
    return classes


class _BadSample(NamedTuple):
    """What a dataset returns for an image it cannot decode: the loader decides in the main process."""
    path: str
    reason: str


class _CheckedBatch(NamedTuple):
    batch: Any  # the collated good samples, or None
    bad: List[_BadSample]


def _checked_collate(samples: List[Any]) -> _CheckedBatch:
    good = [s for s in samples if not isinstance(s, _BadSample)]
    return _CheckedBatch(default_collate(good) if good else None, [s for s in samples if isinstance(s, _BadSample)])


class DecodedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` (its readers, transforms, targets) with our decoder and no silent retry.

    timm's dataset replaces an image it cannot open by the next one; here such an image becomes a
    marker that :class:`CheckedDataLoader` turns into an error (or a counted skip) in the main
    process, where the message stays one line.
    """

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
        if self.transform is not None:
            img = self.transform(img)
        target = -1 if target is None else (self.target_transform(target) if self.target_transform else target)
        return (img, target) if self.additional_features is None else (img, target, *features)


class CheckedDataLoader(DataLoader):
    """A ``DataLoader`` of :func:`_checked_collate` batches: an undecodable image raises :class:`DatasetError`
    naming it, or, with ``skip_bad=True``, is left out and recorded in ``skipped`` (paths)."""

    def __init__(self, *args, skip_bad: bool = False, skip_hint: str = '', **kwargs):
        super().__init__(*args, collate_fn=_checked_collate, **kwargs)
        self.skip_bad = skip_bad
        self.skip_hint = skip_hint
        self.skipped: List[str] = []

    def __iter__(self) -> Iterator[Any]:
        for checked in super().__iter__():
            for bad in checked.bad:
                if not self.skip_bad:
                    raise DatasetError(bad.reason + self.skip_hint)
                _logger.warning(f'Skipped {bad.path}: {bad.reason}')
                self.skipped.append(bad.path)
            if checked.batch is not None:
                yield checked.batch


def _read_class_map(path: str) -> Dict[str, int]:
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    return {name: i for i, name in enumerate(names)}


def build_dataset(
        name: str,
        root: str,
        split: str,
        is_training: bool,
        class_map: Optional[Any] = None,
        input_img_mode: str = 'RGB',
        seed: int = 42,
        batch_size: int = 1,
) -> torch.utils.data.Dataset:
    """``timm.data.create_dataset`` with the image-folder checks of this module.

    ``class_map``: a dict ``{class folder: index}``, a class-list file, or None (sorted folders).
    """
    if isinstance(class_map, str) and class_map:
        class_map = _read_class_map(class_map)
    if is_folder_dataset(name) and not os.path.isfile(root):  # a file root is a tar archive: timm reads it
        split_dir = find_split_folder(root, split)
        classes = check_image_folder(split_dir)
        if class_map:
            unknown = [c for c in classes if c not in class_map]
            if unknown:
                raise DatasetError(
                    f"Class folder(s) {unknown} in '{split_dir}' are not among the training classes "
                    f"({len(class_map)}: {list(class_map)[:10]}...). Use the same class folders in every split.")
        dataset = create_dataset(
            name, root=split_dir, split=split, search_split=False, class_map=class_map or None,
            is_training=is_training, input_img_mode=input_img_mode)
    else:
        dataset = create_dataset(
            name, root=root, split=split, class_map=class_map or None, is_training=is_training,
            input_img_mode=input_img_mode, seed=seed, batch_size=batch_size)
    if type(dataset) is ImageDataset and not dataset.load_bytes:  # timm's file readers: decode with ours
        dataset = DecodedImageDataset(None, reader=dataset.reader, input_img_mode=input_img_mode,
                                      additional_features=dataset.additional_features)
    return dataset


def dataset_classes(dataset: torch.utils.data.Dataset) -> Optional[Dict[str, int]]:
    """The class-name -> index map of a timm or torchvision dataset, when it has one."""
    reader = getattr(dataset, 'reader', None)
    mapping = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if mapping:
        return dict(mapping)
    classes = getattr(dataset, 'classes', None)
    if classes:
        return {str(c): i for i, c in enumerate(classes)}
    return None


def _seed_numpy_in_worker(worker_id: int) -> None:
    # torch seeds `random` and torch in each worker; NumPy would otherwise repeat the parent's stream
    np.random.seed(torch.initial_seed() % 2 ** 32)


def build_train_loader(
        dataset: torch.utils.data.Dataset,
        data_config: Dict[str, Any],
        cfg: Any,
        world_size: int,
        rank: int,
) -> CheckedDataLoader:
    """Training loader: timm train transform, (seed, epoch)-ordered sampler, ``drop_last``.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch.
    """
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=True,
        no_aug=not cfg.augment,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    if isinstance(dataset, torch.utils.data.IterableDataset):
        raise DatasetError('Iterable (streaming) datasets cannot be resumed exactly; use a map-style dataset.')
    if cfg.aug_repeats:
        sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=cfg.aug_repeats)
    else:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise DatasetError(
            f"The training split has {len(dataset)} images, {len(sampler)} per process: fewer than one batch "
            f"of {cfg.batch_size}. Lower --batch-size.")
    return CheckedDataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        drop_last=True,
        # Fresh workers each epoch, seeded from the main process's (checkpointed) torch RNG: the
        # augmentation of epoch e then does not depend on how many epochs this process has run,
        # which persistent workers would break on resume.
        persistent_workers=False,
        worker_init_fn=_seed_numpy_in_worker,
    )


def build_eval_loader(
        dataset: torch.utils.data.Dataset,
        data_config: Dict[str, Any],
        batch_size: int,
        num_workers: int,
        world_size: int = 1,
        rank: int = 0,
        pin_memory: bool = False,
        skip_bad: bool = False,
) -> CheckedDataLoader:
    """Evaluation loader: timm eval transform; rank ``r`` of ``N`` gets images ``r, r+N, ...``.

    ``skip_bad``: leave out images that cannot be decoded (their paths in ``loader.skipped``) instead
    of raising :class:`DatasetError`.
    """
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config.get('crop_mode'),
    )
    shard: torch.utils.data.Dataset = dataset
    if world_size > 1:
        shard = Subset(dataset, range(rank, len(dataset), world_size))
    return CheckedDataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                             pin_memory=pin_memory, drop_last=False, skip_bad=skip_bad,
                             skip_hint='' if skip_bad else ' (validate.py --skip-bad-images leaves such images out, '
                                                          'counted.)')
