"""Register COCO-format datasets (the user's own, or the generated scenes) with detectron2.

:func:`register_coco_instances_dataset` and :func:`register_coco_panoptic_dataset` are what
``train_net.py --coco-dataset`` / ``--coco-panoptic-dataset`` call; unlike detectron2's
``register_coco_instances`` they check at once what training would trip over (paths, every image's
header and size against the json, EXIF rotation included, the fields of every annotation) and
fill class names eagerly, so a mistake fails at start-up with one line naming the fix.
:func:`register_synthetic_dataset` registers both forms of
:func:`~detectron2_ext.data.synthetic.write_synthetic_coco`'s output. Details:
docs/detectron2.md#the-generated-dataset-detectron2_extdata.
"""
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from maformer_zoo.data.images import ImageDecodeError, read_image_header
from maformer_zoo.utils.safe_yaml import short_repr

from .synthetic import panoptic_to_semantic, rgb2id

__all__ = [
    'check_coco_instances', 'register_coco_instances_dataset', 'register_coco_panoptic_dataset',
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_images(images: List, json_file: str, image_dir: str) -> Dict:
    """Every image entry has an id, a file that opens as an image, and the size detectron2 will read."""
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise ValueError(f"'images' of '{json_file}' must be a list of objects; re-export the json.")
    ids = {}
    for i, im in enumerate(images):
        missing = [k for k in ('id', 'file_name', 'width', 'height') if im.get(k) is None]
        if missing:
            raise ValueError(f"Image {i} of '{json_file}' ({short_repr(im.get('file_name'))}) has no "
                             f"{', '.join(missing)}; COCO images need id, file_name, width and height: add them.")
        if im['id'] in ids:
            raise ValueError(f"Images {ids[im['id']]} and {i} of '{json_file}' share id {short_repr(im['id'])}; "
                             f"give every image its own id.")
        ids[im['id']] = i
    absent = [im for im in images if not os.path.isfile(os.path.join(image_dir, im['file_name']))]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} of the {len(images)} images of '{json_file}' are not in '{image_dir}' (first: "
            f"'{absent[0]['file_name']}'); check IMAGE_DIR, or remove their entries from the json.")
    for im in images:
        path = os.path.join(image_dir, im['file_name'])
        try:
            stored, oriented, orientation = read_image_header(path)
        except ImageDecodeError as err:
            raise ValueError(f"{err} (listed in '{json_file}')") from None
        given = (im['width'], im['height'])
        if given == oriented:
            continue
        if given == stored:
            raise ValueError(
                f"Image '{path}' is stored as {stored[0]}x{stored[1]}, as '{json_file}' says, but its EXIF "
                f"orientation ({orientation}) turns it to {oriented[0]}x{oriented[1]}, which is how detectron2 reads "
                f"it: save the image upright without the EXIF orientation (PIL.ImageOps.exif_transpose), or give "
                f"the rotated size and boxes in the json.")
        raise ValueError(f"Image '{path}' is {oriented[0]}x{oriented[1]} but '{json_file}' gives width {given[0]}, "
                         f"height {given[1]}; fix them in the json (or replace the image).")
    return ids


def _check_annotations(data: Dict, json_file: str, image_ids: Dict) -> Dict:
    """Every annotation has the fields detectron2's loader and evaluator read, with values they accept.

    Returns counts for later checks against the config: annotations, non-crowd ones, mask formats.
    """
    annotations = data.get('annotations') or []
    category_ids = {c.get('id') for c in data['categories']}
    trainable, formats = 0, set()
    for i, ann in enumerate(annotations):
        where = f"Annotation {i} (id {short_repr(ann.get('id') if isinstance(ann, dict) else None)}) of '{json_file}'"
        if not isinstance(ann, dict):
            raise ValueError(f"{where} is {short_repr(ann)}, not an object; re-export the json.")
        bbox = ann.get('bbox')
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where}: 'bbox' is {short_repr(bbox) if 'bbox' in ann else 'missing'}; COCO boxes "
                             f"are [x, y, width, height], 4 numbers: fix or remove the annotation.")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: 'bbox' {short_repr(bbox)} has a negative width or height; COCO boxes are "
                             f"[x, y, width, height], not corners: fix the box.")
        category = ann.get('category_id')
        if isinstance(category, bool) or not isinstance(category, int) or category not in category_ids:
            raise ValueError(f"{where}: 'category_id' is {short_repr(category)}; it must be one of the integer ids "
                             f"of 'categories' ({sorted(category_ids)[:10]}): fix it.")
        if ann.get('image_id') is None or ann['image_id'] not in image_ids:
            raise ValueError(f"{where}: 'image_id' {short_repr(ann.get('image_id'))} is not the id of an image of "
                             f"the json; fix it or remove the annotation.")
        crowd = ann.get('iscrowd')
        if crowd not in (0, 1) or isinstance(crowd, bool):
            raise ValueError(f"{where}: 'iscrowd' is {short_repr(crowd) if 'iscrowd' in ann else 'missing'}; COCO "
                             f"annotations need iscrowd 0 (an object) or 1 (a crowd region): add it.")
        trainable += crowd == 0
        segmentation = ann.get('segmentation')
        if isinstance(segmentation, dict):
            if 'counts' not in segmentation or 'size' not in segmentation:
                raise ValueError(f"{where}: an RLE 'segmentation' needs 'counts' and 'size'; fix it.")
            formats.add('rle')
        elif isinstance(segmentation, list) and segmentation:
            if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)
                       for p in segmentation):
                raise ValueError(f"{where}: 'segmentation' polygons must be lists of x, y numbers (3 points or "
                                 f"more): fix or remove it.")
            formats.add('polygon')
        elif segmentation not in (None, []):
            raise ValueError(f"{where}: 'segmentation' is {short_repr(segmentation)}; use polygons (lists of x, y) "
                             f"or an RLE object.")
    return dict(num_annotations=len(annotations), num_trainable_annotations=int(trainable),
                mask_formats=sorted(formats))


def check_coco_instances(json_file: str, image_dir: str, data: Optional[Dict] = None) -> Dict:
    """The checks of :func:`register_coco_instances_dataset` (images, sizes, annotation fields); returns counts.

    Raises ``ValueError`` or ``FileNotFoundError`` with one line naming the entry and the fix.
    """
    data = data if data is not None else _load_json(json_file)
    if not isinstance(data.get('categories'), list) or not all(isinstance(c, dict) for c in data['categories']):
        raise ValueError(f"'categories' of '{json_file}' must be a list of objects with 'id' and 'name'.")
    if not isinstance(data.get('annotations', []), list):
        raise ValueError(f"'annotations' of '{json_file}' must be a list; re-export the json.")
    image_ids = _check_images(data['images'], json_file, image_dir)
    return _check_annotations(data, json_file, image_ids)


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
    counts = check_coco_instances(json_file, image_dir, data)
    metadata = dict(
        json_file=json_file, image_root=image_dir, evaluator_type='coco', **counts,
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
    instances = _load_json(instances_json)
    counts = check_coco_instances(instances_json, image_dir, instances)
    instance_ids = sorted(c['id'] for c in instances['categories'])
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
        evaluator_type='coco_panoptic_seg', ignore_label=255, label_divisor=1000, **counts,
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

