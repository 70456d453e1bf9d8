"""Register COCO-format datasets (the user's own, or the generated scenes) with detectron2.

:func:`register_coco_instances_dataset` and :func:`register_coco_panoptic_dataset` are what
``train_net.py --coco-dataset`` / ``--coco-panoptic-dataset`` call; unlike detectron2's
``register_coco_instances`` they check paths at once and fill class names eagerly, so a typo fails
with the path in the message. :func:`register_synthetic_dataset` registers both forms of
:func:`~detectron2_ext.data.synthetic.write_synthetic_coco`'s output. Details: docs/detectron2.md,
"The generated dataset".
"""
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic import panoptic_to_semantic, rgb2id

__all__ = [
    'register_coco_instances_dataset', 'register_coco_panoptic_dataset',
    'register_synthetic_dataset', 'dataset_num_classes',
]
logger = logging.getLogger(__name__)


def _check_exists(path: str, what: str, option: str, is_dir: bool) -> str:
    exists = os.path.isdir(path) if is_dir else os.path.isfile(path)
    if not exists:
        kind = 'directory' if is_dir else 'file'
        raise FileNotFoundError(
            f"{what} {kind} '{path}' does not exist (given to {option}). Check the path; relative "
            f"paths are resolved from the current directory '{os.getcwd()}'.")
    return os.path.abspath(path)


def _load_json(path: str) -> Dict:
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise ValueError(f"'{path}' is not valid JSON (line {getattr(err, 'lineno', '?')}): fix or re-export it.") from None
    if not isinstance(data, dict) or 'categories' not in data or 'images' not in data:
        raise ValueError(f"'{path}' is not a COCO json: it needs 'images' and 'categories' keys.")
    return data


def _palette(categories: List[Dict]) -> List[List[int]]:
    rng = np.random.default_rng(0)
    return [list(c['color']) if 'color' in c else rng.integers(0, 256, 3).tolist()
            for c in categories]


def _thing_metadata(thing_categories: List[Dict]) -> Dict:
    thing_categories = sorted(thing_categories, key=lambda c: c['id'])
    return dict(
        thing_classes=[c['name'] for c in thing_categories],
        thing_colors=_palette(thing_categories),
        thing_dataset_id_to_contiguous_id={c['id']: i for i, c in enumerate(thing_categories)},
    )


def _register_once(name: str, loader, metadata: Dict) -> None:
    """Register ``name`` unless the identical registration exists; differing ones are an error."""
    if name in DatasetCatalog.list():
        previous = MetadataCatalog.get(name).get('registration', None)
        if previous == metadata['registration']:
            return
        raise ValueError(
            f"Dataset '{name}' is already registered with different files ({previous}); pick "
            f"another name or remove it with DatasetCatalog.remove('{name}').")
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_coco_instances_dataset(name: str, json_file: str, image_dir: str) -> None:
    """Register a COCO instances dataset (boxes, and masks as polygons or RLE) as ``name``.

    Args:
        name: the dataset name used in ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
        json_file: COCO instances json (``images``, ``annotations``, ``categories``).
        image_dir: directory the json's ``file_name`` entries are relative to.

    The metadata (``thing_classes``, ``evaluator_type='coco'``, ``json_file``) is what detectron2's
    ``COCOEvaluator`` and ``Visualizer`` expect.
    """
    option = '--coco-dataset NAME JSON IMAGE_DIR'
    json_file = _check_exists(json_file, 'COCO instances json', option, is_dir=False)
    image_dir = _check_exists(image_dir, 'Image', option, is_dir=True)
    data = _load_json(json_file)
    metadata = dict(
        json_file=json_file, image_root=image_dir, evaluator_type='coco',
        num_annotations=len(data.get('annotations') or []),
        registration=dict(kind='coco_instances', json_file=json_file, image_dir=image_dir),
        **_thing_metadata(data['categories']),
    )
    _register_once(name, lambda: load_coco_json(json_file, image_dir, name), metadata)


def _check_panoptic_annotations(pan: Dict, path: str) -> None:
    """One line naming the first annotation or segment that lacks what COCO panoptic defines."""
    annotations = pan.get('annotations')
    if not isinstance(annotations, list):
        raise ValueError(f"'{path}' has no 'annotations' list: is it a COCO panoptic json "
                         f"(not an instances json)?")
    category_ids = {c.get('id') for c in pan['categories']}
    for i, ann in enumerate(annotations):
        missing = [k for k in ('file_name', 'segments_info') if k not in ann]
        if missing:
            raise ValueError(f"Annotation {i} of '{path}' lacks {missing}: COCO panoptic annotations "
                             f"need 'file_name' and 'segments_info'.")
        for segment in ann['segments_info']:
            if 'id' not in segment or segment.get('category_id') not in category_ids:
                raise ValueError(f"A segment of annotation {i} ('{ann['file_name']}') in '{path}' needs an "
                                 f"'id' and a 'category_id' listed in 'categories'; it has {segment}.")


def _ensure_semantic_pngs(panoptic_json: Dict, panoptic_dir: str, sem_seg_dir: str,
                          stuff_contiguous: Dict[int, int]) -> None:
    """Write the separated semantic PNG of every panoptic PNG that does not have one yet."""
    missing = [ann for ann in panoptic_json['annotations']
               if not os.path.isfile(os.path.join(sem_seg_dir, ann['file_name']))]
    if not missing:
        return
    logger.info(f'Writing {len(missing)} stuff-only semantic PNGs for Panoptic FPN to {sem_seg_dir}')
    try:
        os.makedirs(sem_seg_dir, exist_ok=True)
    except OSError as err:
        raise OSError(f"Cannot create '{sem_seg_dir}' for the semantic labels Panoptic FPN needs "
                      f"({err}); pass a writable sem_seg_dir.") from err
    for ann in missing:
        pan = np.asarray(Image.open(os.path.join(panoptic_dir, ann['file_name'])).convert('RGB'))
        semantic = panoptic_to_semantic(rgb2id(pan), ann['segments_info'], stuff_contiguous)
        Image.fromarray(semantic).save(os.path.join(sem_seg_dir, ann['file_name']))


def register_coco_panoptic_dataset(
        name: str,
        image_dir: str,
        panoptic_dir: str,
        panoptic_json: str,
        instances_json: str,
        sem_seg_dir: Optional[str] = None,
) -> None:
    """Register a COCO panoptic dataset for Panoptic FPN as ``name`` (detectron2's "separated" form).

    Each dataset dict holds the instance annotations (from ``instances_json``) and a
    ``sem_seg_file_name`` (stuff classes ``1..S``, things ``0``); evaluation reads the panoptic
    PNGs and json (PQ) and the semantic PNGs (mIoU).

    Args:
        name: the dataset name.
        image_dir: directory of the images.
        panoptic_dir: directory of the COCO panoptic PNGs (segment id = R + 256 G + 256^2 B).
        panoptic_json: COCO panoptic json (``annotations[*].segments_info``, ``categories`` with
            ``isthing``).
        instances_json: COCO instances json of the same images (thing categories).
        sem_seg_dir: directory of the separated semantic PNGs; default ``<panoptic_dir>_semseg``.
            Missing PNGs are written there from the panoptic PNGs (once).
    """
    option = '--coco-panoptic-dataset NAME IMAGE_DIR PANOPTIC_DIR PANOPTIC_JSON INSTANCES_JSON'
    image_dir = _check_exists(image_dir, 'Image', option, is_dir=True)
    panoptic_dir = _check_exists(panoptic_dir, 'Panoptic PNG', option, is_dir=True)
    panoptic_json = _check_exists(panoptic_json, 'COCO panoptic json', option, is_dir=False)
    instances_json = _check_exists(instances_json, 'COCO instances json', option, is_dir=False)
    sem_seg_dir = os.path.abspath(sem_seg_dir or panoptic_dir.rstrip(os.sep) + '_semseg')

    pan = _load_json(panoptic_json)
    _check_panoptic_annotations(pan, panoptic_json)
    if any('isthing' not in c for c in pan['categories']):
        raise ValueError(f"Categories in '{panoptic_json}' need an 'isthing' field (COCO panoptic).")
    things = [c for c in pan['categories'] if c['isthing']]
    stuff = sorted((c for c in pan['categories'] if not c['isthing']), key=lambda c: c['id'])
    instance_ids = sorted(c['id'] for c in _load_json(instances_json)['categories'])
    if instance_ids != sorted(c['id'] for c in things):
        raise ValueError(f"The thing categories of '{panoptic_json}' (ids "
                         f"{sorted(c['id'] for c in things)}) and the categories of "
                         f"'{instances_json}' (ids {instance_ids}) must be the same.")
    stuff_contiguous = {c['id']: i + 1 for i, c in enumerate(stuff)}
    _ensure_semantic_pngs(pan, panoptic_dir, sem_seg_dir, stuff_contiguous)

    def load():
        dicts = load_coco_json(instances_json, image_dir, name)
        for d in dicts:
            stem = os.path.splitext(os.path.basename(d['file_name']))[0]
            d['sem_seg_file_name'] = os.path.join(sem_seg_dir, stem + '.png')
        return dicts

    metadata = dict(
        image_root=image_dir, panoptic_root=panoptic_dir, panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_dir, json_file=instances_json,
        evaluator_type='coco_panoptic_seg', ignore_label=255, label_divisor=1000,
        stuff_classes=['things'] + [c['name'] for c in stuff],
        stuff_colors=[[82, 18, 128]] + _palette(stuff),
        # 0 is the "things" class of the separated semantic labels (detectron2's convention).
        stuff_dataset_id_to_contiguous_id={0: 0, **stuff_contiguous},
        registration=dict(kind='coco_panoptic', image_dir=image_dir, panoptic_dir=panoptic_dir,
                          panoptic_json=panoptic_json, instances_json=instances_json,
                          sem_seg_dir=sem_seg_dir),
        **_thing_metadata(things),
    )
    _register_once(name, load, metadata)


def register_synthetic_dataset(name: str, root: str, split: str = 'train') -> Dict[str, str]:
    """Register ``root/<split>`` written by ``write_synthetic_coco`` as ``name`` and ``name_panoptic``.

    ``name`` is the instance dataset (Mask R-CNN, Cascade Mask R-CNN); ``name_panoptic`` is the
    separated panoptic dataset (Panoptic FPN). The masks are RLE, so configs training on it need
    ``INPUT.MASK_FORMAT: bitmask``. Returns the two names.
    """
    split_dir = os.path.join(root, split)
    if not os.path.isfile(os.path.join(split_dir, 'instances.json')):
        raise FileNotFoundError(
            f"No synthetic dataset at '{split_dir}': write it first with "
            f"detectron2_ext.data.write_synthetic_coco('{root}', split='{split}').")
    register_coco_instances_dataset(name, os.path.join(split_dir, 'instances.json'),
                                    os.path.join(split_dir, 'images'))
    register_coco_panoptic_dataset(
        name + '_panoptic', os.path.join(split_dir, 'images'), os.path.join(split_dir, 'panoptic'),
        os.path.join(split_dir, 'panoptic.json'), os.path.join(split_dir, 'instances.json'),
        sem_seg_dir=os.path.join(split_dir, 'panoptic_semseg'))
    return dict(instances=name, panoptic=name + '_panoptic')


def dataset_num_classes(name: str) -> Dict[str, int]:
    """Class counts a model needs for a registered dataset: things, and stuff (incl. 'things')."""
    meta = MetadataCatalog.get(name)
    counts = dict(things=len(meta.get('thing_classes', [])))
    if meta.get('stuff_classes', None) is not None:
        counts['stuff'] = len(meta.stuff_classes)
    return counts

