"""Semantic segmentation datasets: the user's images + same-named label PNGs
(:func:`register_sem_seg_dataset`, checked against the class count by :func:`set_sem_seg_num_classes`),
ADE20K's raw annotations as mmseg reads them, and generated scenes. docs/segmentation.md#train-on-your-data.
"""
import logging
import os
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .register import _check_image, _existing, _register_once
from .sem_seg_labels import LabelFormat, read_raw_label
from .synthetic import CATEGORIES, _split_rng, render_scene

__all__ = ['register_sem_seg_dataset', 'set_sem_seg_num_classes', 'write_synthetic_sem_seg',
           'register_ade20k_raw', 'label_format_of', 'SEM_SEG_IGNORE']
logger = logging.getLogger(__name__)
SEM_SEG_IGNORE = 255
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_OPTION = '--sem-seg-dataset NAME IMAGE_DIR LABEL_DIR'


def _pairs(image_dir: str, label_dir: str) -> List[Tuple[str, str]]:
    """(image, label) paths matched by file stem; an image without a label is an error."""
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not images:
        raise FileNotFoundError(f"No images ({', '.join(_IMAGE_EXTENSIONS)}) in '{image_dir}' (given to "
                                f"{_OPTION}): the dataset would be empty; check IMAGE_DIR.")
    pairs = [(os.path.join(image_dir, name), os.path.join(label_dir, os.path.splitext(name)[0] + '.png'))
             for name in images]
    missing = [label for _, label in pairs if not os.path.isfile(label)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in '{image_dir}' have no label PNG of the same name in '{label_dir}', e.g. "
            f"'{missing[0]}' is missing (given to {_OPTION}); add the labels or move those images out.")
    return pairs


def _advice(values: Sequence[int], bad: Sequence[int], fmt: LabelFormat, num_classes: int) -> str:
    """The fix for the out-of-range file values ``bad`` among all file values ``values``."""
    k, shift = num_classes, int(fmt.reduce_zero_label)
    others = [v for v in values if v not in bad and v != fmt.ignore_label]
    if not fmt.reduce_zero_label and 0 in values and list(bad) == [k]:
        return (f"the labels run 0..{k}: if 0 marks unlabelled ('other') pixels, as in ADE20K's raw annotations, "
                f"read them with reduce_zero_label ({_OPTION} reduce_zero_label, or the config's "
                f"DATASETS.REDUCE_ZERO_LABEL); if 0..{k} are all classes, set MODEL.SEM_SEG_HEAD.NUM_CLASSES {k + 1}.")
    if len(bad) == 1 and (not others or bad[0] > max(others) + 1):
        return (f"if {bad[0]} marks unlabelled pixels, give it as the ignore value ({_OPTION} "
                f"ignore_label={bad[0]}); if it is a class, set MODEL.SEM_SEG_HEAD.NUM_CLASSES {bad[0] + 1 - shift}.")
    return (f"set MODEL.SEM_SEG_HEAD.NUM_CLASSES {max(bad) + 1 - shift} "
            f"(labels must be 0..{k - 1} or the ignore value {fmt.ignore_label}).")


def _check_labels(name: str, pairs: Sequence[Tuple[str, str]], num_classes: int, fmt: LabelFormat) -> None:
    """Every label reads, its image decodes (header) and has its size, the values are classes or ignored
    after ``fmt``, and some pixel is labelled; one line naming the file and the fix otherwise."""
    first_file: Dict[int, str] = {}
    for image_file, label_file in pairs:
        raw = read_raw_label(label_file)
        _check_image(image_file, raw.shape[::-1], f"its label '{label_file}' is {raw.shape[1]}x{raw.shape[0]} "
                     f"(width x height)", prefix=f"Dataset '{name}': ")
        for value in np.unique(raw).tolist():
            first_file.setdefault(int(value), label_file)
    values = sorted(first_file)
    labels = fmt.apply(np.asarray(values, dtype=np.int64)).tolist()
    bad = [v for v, lab in zip(values, labels) if lab != fmt.ignore_value and not 0 <= lab < num_classes]
    if bad:
        shown = f'value {bad[0]}' + (' (after reduce_zero_label)' if fmt.reduce_zero_label else '')
        raise ValueError(
            f"Dataset '{name}': label file '{first_file[bad[0]]}' has class {bad[0]}, but the model has "
            f"{num_classes} classes (MODEL.SEM_SEG_HEAD.NUM_CLASSES); "
            f"{'out-of-range ' + shown + ': ' if len(bad) > 1 or fmt.reduce_zero_label else ''}"
            f"{_advice(values, bad, fmt, num_classes)}")
    if all(lab == fmt.ignore_value for lab in labels):
        flags = f"ignore_label {fmt.ignore_label}" + (' and reduce_zero_label' if fmt.reduce_zero_label else '')
        raise ValueError(
            f"Dataset '{name}': no pixel of its {len(pairs)} label file(s) is labelled (values {values}, read "
            f"as ignored with {flags}): nothing to train or evaluate; check the label files and the {_OPTION} options.")


def register_sem_seg_dataset(name: str, image_dir: str, label_dir: str, *options: str, reduce_zero_label: bool = False,
                             ignore_label: int = SEM_SEG_IGNORE, check_dirs: bool = True) -> None:
    """Register images + same-named ``.png`` label maps (palette, 8- or 16-bit) as ``name``, with the metadata
    detectron2's ``SemSegEvaluator`` reads.

    Args:
        options: ``train_net.py``'s words ``'reduce_zero_label'`` / ``'ignore_label=N'``: the same as
            ``reduce_zero_label`` (0 ignored, ``v`` class ``v - 1``) and ``ignore_label`` (the files' unlabelled value).
        check_dirs: check the directories now (``False``: at :func:`set_sem_seg_num_classes`).
    """
    for option in options:
        key, _, value = option.partition('=')
        if option == 'reduce_zero_label':
            reduce_zero_label = True
        elif key == 'ignore_label' and value.isdigit():
            ignore_label = int(value)
        else:
            raise ValueError(f"{_OPTION}: unknown option '{option}'; after the three values it takes "
                             f"'reduce_zero_label' and 'ignore_label=N'.")
    if check_dirs:
        image_dir, label_dir = _existing(_OPTION, ('Image directory', image_dir), ('Label directory', label_dir))
        _pairs(image_dir, label_dir)

    def load() -> List[Dict]:
        meta = MetadataCatalog.get(name)
        if meta.get('label_format', None) is None:
            raise ValueError(f"Dataset '{name}' has no class count: call set_sem_seg_num_classes('{name}', "
                             f"MODEL.SEM_SEG_HEAD.NUM_CLASSES) first.")
        return [dict(file_name=image, sem_seg_file_name=label, label_format=meta.label_format)
                for image, label in _pairs(image_dir, label_dir)]

    _register_once(name, load, dict(
        image_root=image_dir, sem_seg_root=label_dir, evaluator_type='sem_seg', ignore_label=SEM_SEG_IGNORE,
        registration=dict(kind='sem_seg', image_dir=image_dir, label_dir=label_dir,
                          reduce_zero_label=bool(reduce_zero_label), ignore_label=int(ignore_label))))


def register_ade20k_raw(root: Optional[str] = None) -> None:
    """Register ``ade20k_raw_sem_seg_train`` / ``_val``: ADE20K's images and raw annotations (0 = "other")
    under ``root`` (default ``$DETECTRON2_DATASETS`` or ``datasets``), checked when a config uses them."""
    root = os.path.join(root or os.getenv('DETECTRON2_DATASETS', 'datasets'), 'ADEChallengeData2016')
    for split, folder in (('train', 'training'), ('val', 'validation')):
        name = f'ade20k_raw_sem_seg_{split}'
        if name not in DatasetCatalog.list():
            register_sem_seg_dataset(name, os.path.join(root, 'images', folder),
                                     os.path.join(root, 'annotations', folder), check_dirs=False)
            MetadataCatalog.get(name).set(stuff_classes=ADE20K_SEM_SEG_CATEGORIES[:])


def set_sem_seg_num_classes(name: str, num_classes: int, class_names: Optional[Sequence[str]] = None,
                            reduce_zero_label: bool = False, ignore_value: int = SEM_SEG_IGNORE) -> None:
    """Give the dataset ``name`` of :func:`register_sem_seg_dataset` its class count and label format,
    and check every label file against them (one read of each); a no-op for other datasets.

    Args:
        num_classes: ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``; one that contradicts names already set is an error.
        class_names: names of the classes (default: those registered, else ``'0'``, ``'1'``...).
        reduce_zero_label: also read with ``reduce_zero_label`` (``DATASETS.REDUCE_ZERO_LABEL``).
        ignore_value: ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``; must be the metadata's ``ignore_label``.
    """
    meta = MetadataCatalog.get(name)
    registration = meta.get('registration', {})
    if registration.get('kind') != 'sem_seg':
        return
    existing = meta.get('stuff_classes', None)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"Dataset '{name}': {len(class_names)} class names for {num_classes} classes.")
    if ignore_value != meta.ignore_label:
        raise ValueError(f"Dataset '{name}' marks unlabelled pixels {meta.ignore_label} but "
                         f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is {ignore_value}: set it to {meta.ignore_label}.")
    if existing is not None and len(existing) != num_classes:
        raise ValueError(f"Dataset '{name}' has {len(existing)} classes but {num_classes} were asked for: "
                         f"set MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(existing)}.")
    fmt = LabelFormat(reduce_zero_label=registration['reduce_zero_label'] or bool(reduce_zero_label),
                      ignore_label=registration['ignore_label'], ignore_value=meta.ignore_label)
    if meta.get('label_format', None) is not None:
        if meta.label_format != asdict(fmt):
            raise ValueError(f"Dataset '{name}' is already read as {meta.label_format}, not {asdict(fmt)}.")
        return
    dirs = _existing(f"dataset '{name}'; for ADE20K set $DETECTRON2_DATASETS, docs/segmentation.md#ade20k",
                     ('Image directory', registration['image_dir']), ('Label directory', registration['label_dir']))
    _check_labels(name, _pairs(*dirs), num_classes, fmt)
    if existing is None:
        meta.set(stuff_classes=list(class_names or map(str, range(num_classes))))
    meta.set(label_format=asdict(fmt))
    logger.info(f"Dataset '{name}': {num_classes} semantic classes, labels read as {fmt}.")


def label_format_of(name: str) -> LabelFormat:
    """The :class:`LabelFormat` of a registered dataset (others than ours: values kept, ``ignore_label``)."""
    meta = MetadataCatalog.get(name)
    if meta.get('label_format', None) is not None:
        return LabelFormat(**meta.label_format)
    ignore = meta.get('ignore_label', SEM_SEG_IGNORE)
    return LabelFormat(ignore_label=ignore, ignore_value=ignore)


def write_synthetic_sem_seg(root: str, num_images: int = 8, image_size: Tuple[int, int] = (128, 160),
                            seed: int = 0, split: str = 'train') -> Dict:
    """The scenes of :func:`~detectron2_ext.data.synthetic.write_synthetic_coco` (same seed and split: same
    images) in ``root/<split>/images``, each pixel's category index in ``CATEGORIES`` (6 classes, none ignored)
    in ``root/<split>/labels``; returns ``image_dir``, ``label_dir`` and ``class_names``."""
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    image_dir, label_dir = os.path.join(root, split, 'images'), os.path.join(root, split, 'labels')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    lookup = np.full(max(c['id'] for c in CATEGORIES) + 1, SEM_SEG_IGNORE, dtype=np.uint8)
    lookup[[c['id'] for c in CATEGORIES]] = np.arange(len(CATEGORIES))
    for i, image_seed in enumerate(_split_rng(seed, split).spawn(num_images)):
        image, thing_index, thing_cats, stuff = render_scene(np.random.default_rng(image_seed), tuple(image_size))
        for t, category_id in enumerate(thing_cats):
            stuff[thing_index == t] = category_id
        Image.fromarray(image).save(os.path.join(image_dir, f'{i + 1:06d}.jpg'), quality=95)
        Image.fromarray(lookup[stuff]).save(os.path.join(label_dir, f'{i + 1:06d}.png'))
    return dict(image_dir=image_dir, label_dir=label_dir, class_names=[c['name'] for c in CATEGORIES])
