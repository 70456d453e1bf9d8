"""Semantic segmentation data: the user's images + label PNGs, and generated scenes for tests.

* :func:`register_sem_seg_dataset`: a directory of images and a directory of same-named ``.png``
  label maps (pixel value = class id ``0..K-1``, 255 = ignore), what ``train_net.py
  --sem-seg-dataset NAME IMAGE_DIR LABEL_DIR`` calls. ``K`` comes from the model config
  (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``) through :func:`set_sem_seg_num_classes`, which checks every
  label file against it, so a wrong class count fails in one line before the model is built
  rather than as an index error inside the loss.
* :func:`write_synthetic_sem_seg`: the procedural scenes of :mod:`.synthetic` with full semantic
  labels (3 things + 3 stuff classes), for tests and quick runs.

ADE20K needs nothing here: detectron2 registers ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val``
from ``$DETECTRON2_DATASETS/ADEChallengeData2016`` (docs/segmentation.md).
"""
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog

from .register import _check_exists, _register_once
from .synthetic import CATEGORIES, _split_rng, render_scene

__all__ = ['register_sem_seg_dataset', 'set_sem_seg_num_classes', 'write_synthetic_sem_seg',
           'SEM_SEG_IGNORE']
logger = logging.getLogger(__name__)
SEM_SEG_IGNORE = 255
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_OPTION = '--sem-seg-dataset NAME IMAGE_DIR LABEL_DIR'


def _pairs(image_dir: str, label_dir: str) -> List[Tuple[str, str]]:
    """(image, label) paths matched by file stem; an image without a label is an error."""
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not images:
        raise FileNotFoundError(f"No images ({', '.join(_IMAGE_EXTENSIONS)}) in '{image_dir}' "
                                f"(given to {_OPTION}).")
    pairs, missing = [], []
    for name in images:
        label = os.path.join(label_dir, os.path.splitext(name)[0] + '.png')
        (pairs if os.path.isfile(label) else missing).append((os.path.join(image_dir, name), label))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in '{image_dir}' have no label PNG of the same name in "
            f"'{label_dir}', e.g. '{missing[0][1]}' is missing (given to {_OPTION}).")
    return pairs


def _check_labels(name: str, pairs: Sequence[Tuple[str, str]], num_classes: int) -> None:
    for _, label_file in pairs:
        values = np.unique(np.asarray(Image.open(label_file)))
        bad = values[(values >= num_classes) & (values != SEM_SEG_IGNORE)]
        if bad.size:
            raise ValueError(
                f"Dataset '{name}': label file '{label_file}' has class {int(bad[0])}, but the "
                f"model has {num_classes} classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES): labels must be "
                f"0..{num_classes - 1} or {SEM_SEG_IGNORE} (ignore); raise NUM_CLASSES or fix the "
                f"labels.")


def register_sem_seg_dataset(name: str, image_dir: str, label_dir: str,
                             num_classes: Optional[int] = None,
                             class_names: Optional[Sequence[str]] = None) -> None:
    """Register images + same-named label PNGs as the semantic segmentation dataset ``name``.

    Args:
        name: the dataset name used in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        image_dir: directory of the images (jpg, png, ...).
        label_dir: directory of ``<image stem>.png`` label maps (single channel, 255 = ignore).
        num_classes: the class count; ``None`` leaves it to :func:`set_sem_seg_num_classes`
            (``train_net.py`` sets it from ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``).
        class_names: names of the classes (default ``'0'``, ``'1'``, ...).

    The metadata is what detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, pixel accuracy) reads:
    ``evaluator_type='sem_seg'``, ``stuff_classes``, ``ignore_label``.
    """
    image_dir = _check_exists(image_dir, 'Image', _OPTION, is_dir=True)
    label_dir = _check_exists(label_dir, 'Label', _OPTION, is_dir=True)
    pairs = _pairs(image_dir, label_dir)

    def load() -> List[Dict]:
        if MetadataCatalog.get(name).get('stuff_classes', None) is None:
            raise ValueError(f"Dataset '{name}' has no class count: call set_sem_seg_num_classes("
                             f"'{name}', MODEL.SEM_SEG_HEAD.NUM_CLASSES) first.")
        return [dict(file_name=image, sem_seg_file_name=label) for image, label in pairs]

    metadata = dict(image_root=image_dir, sem_seg_root=label_dir, evaluator_type='sem_seg',
                    ignore_label=SEM_SEG_IGNORE,
                    registration=dict(kind='sem_seg', image_dir=image_dir, label_dir=label_dir))
    _register_once(name, load, metadata)
    if class_names is not None or num_classes is not None:
        set_sem_seg_num_classes(name, num_classes or len(class_names), class_names)


def set_sem_seg_num_classes(name: str, num_classes: int,
                            class_names: Optional[Sequence[str]] = None) -> None:
    """Give the dataset ``name`` (from :func:`register_sem_seg_dataset`) its class count and check
    every label file against it (one read of each file).

    A no-op for other datasets (detectron2's builtin ones carry their own classes). A count that
    contradicts names already set is an error.
    """
    meta = MetadataCatalog.get(name)
    registration = meta.get('registration', {})
    if registration.get('kind') != 'sem_seg':
        return
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"Dataset '{name}': {len(class_names)} class names for {num_classes} "
                         f"classes.")
    existing = meta.get('stuff_classes', None)
    if existing is not None:
        if len(existing) != num_classes:
            raise ValueError(
                f"Dataset '{name}' has {len(existing)} classes but {num_classes} were asked for: "
                f"set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(existing)}.")
        return
    _check_labels(name, _pairs(registration['image_dir'], registration['label_dir']), num_classes)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    meta.set(stuff_classes=names)
    logger.info(f"Dataset '{name}': {num_classes} semantic classes.")


def write_synthetic_sem_seg(root: str, num_images: int = 8, image_size: Tuple[int, int] = (128, 160),
                            seed: int = 0, split: str = 'train') -> Dict:
    """Write procedural scenes with semantic labels under ``root/<split>/{images,labels}``.

    The scenes are those of :func:`~detectron2_ext.data.synthetic.write_synthetic_coco` (same
    seed and split: same images); the label of a pixel is the index of its category in
    :data:`~detectron2_ext.data.synthetic.CATEGORIES` (circle, square, triangle, sky, ground,
    water), so 6 classes and no ignored pixel.

    Returns:
        dict with ``image_dir``, ``label_dir`` and ``class_names``.
    """
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    image_dir = os.path.join(root, split, 'images')
    label_dir = os.path.join(root, split, 'labels')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    index_of = {c['id']: i for i, c in enumerate(CATEGORIES)}
    lookup = np.full(max(index_of) + 1, SEM_SEG_IGNORE, dtype=np.uint8)
    for category_id, index in index_of.items():
        lookup[category_id] = index
    for i, image_seed in enumerate(_split_rng(seed, split).spawn(num_images)):
        image, thing_index, thing_cats, stuff = render_scene(np.random.default_rng(image_seed),
                                                             tuple(image_size))
        category = stuff.copy()
        for t, category_id in enumerate(thing_cats):
            category[thing_index == t] = category_id
        stem = f'{i + 1:06d}'
        Image.fromarray(image).save(os.path.join(image_dir, stem + '.jpg'), quality=95)
        Image.fromarray(lookup[category]).save(os.path.join(label_dir, stem + '.png'))
    return dict(image_dir=image_dir, label_dir=label_dir,
                class_names=[c['name'] for c in CATEGORIES])
