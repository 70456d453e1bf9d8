"""The generated COCO-format dataset: deterministic, valid COCO, panoptic == instances."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from panopticapi.utils import id2rgb, rgb2id
from pycocotools.coco import COCO

from detectron2_ext.data.synthetic import (
    STUFF_CATEGORIES, THING_CATEGORIES, panoptic_to_semantic, write_synthetic_coco,
)

NUM_IMAGES = 6


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('synthetic')
    return write_synthetic_coco(str(root), num_images=NUM_IMAGES, image_size=(96, 112), seed=3)


def _all_files(split_dir):
    return sorted(os.path.relpath(os.path.join(d, f), split_dir)
                  for d, _, files in os.walk(split_dir) for f in files)


def test_returns_paths_and_categories(dataset):
    for key in ('image_dir', 'panoptic_dir', 'sem_seg_dir'):
        assert len(os.listdir(dataset[key])) == NUM_IMAGES
    assert os.path.isfile(dataset['instances_json']) and os.path.isfile(dataset['panoptic_json'])
    assert [c['isthing'] for c in dataset['categories']] == [1, 1, 1, 0, 0, 0]


def test_deterministic_from_seed(dataset, tmp_path):
    again = write_synthetic_coco(str(tmp_path / 'a'), num_images=NUM_IMAGES, image_size=(96, 112),
                                 seed=3)
    split_dir, split_again = (os.path.dirname(p['instances_json']) for p in (dataset, again))
    files = _all_files(split_dir)
    assert files == _all_files(split_again)
    match, mismatch, errors = filecmp.cmpfiles(split_dir, split_again, files, shallow=False)
    assert not mismatch and not errors and len(match) == 3 * NUM_IMAGES + 2

    other_seed = write_synthetic_coco(str(tmp_path / 'b'), num_images=NUM_IMAGES,
                                      image_size=(96, 112), seed=4)
    other_split = write_synthetic_coco(str(tmp_path / 'a'), num_images=NUM_IMAGES,
                                       image_size=(96, 112), seed=3, split='val')
    first = np.asarray(Image.open(os.path.join(dataset['image_dir'], '000001.jpg')))
    for other in (other_seed, other_split):
        image = np.asarray(Image.open(os.path.join(other['image_dir'], '000001.jpg')))
        assert np.abs(first.astype(int) - image).mean() > 5


def test_instances_json_is_valid_coco(dataset):
    coco = COCO(dataset['instances_json'])
    assert sorted(coco.getCatIds()) == [c['id'] for c in THING_CATEGORIES]
    assert len(coco.getImgIds()) == NUM_IMAGES
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= NUM_IMAGES  # at least one object per image
    assert {a['category_id'] for a in anns} <= {1, 2, 3}
    for ann in anns:
        mask = coco.annToMask(ann)
        img = coco.loadImgs(ann['image_id'])[0]
        assert mask.shape == (img['height'], img['width'])
        assert ann['area'] == mask.sum() >= 24
        np.testing.assert_allclose(ann['bbox'], mask_util.toBbox(ann['segmentation']))
        assert ann['iscrowd'] == 0
    # Boxes evaluated against themselves with the official COCOeval give AP 1.
    from pycocotools.cocoeval import COCOeval
    dets = coco.loadRes([dict(image_id=a['image_id'], category_id=a['category_id'],
                              segmentation=a['segmentation'], score=1.0) for a in anns])
    evaluator = COCOeval(coco, dets, 'segm')
    evaluator.evaluate(), evaluator.accumulate()
    precision = evaluator.eval['precision'][0, :, :, 0, -1]  # IoU .5, all areas, 100 dets
    assert np.all(precision[precision > -1] == 1.0)


def test_panoptic_agrees_with_instances(dataset):
    instances = json.load(open(dataset['instances_json']))
    panoptic = json.load(open(dataset['panoptic_json']))
    assert {c['id'] for c in panoptic['categories']} == {c['id'] for c in
                                                          THING_CATEGORIES + STUFF_CATEGORIES}
    by_id = {a['id']: a for a in instances['annotations']}
    stuff_ids = {c['id'] for c in STUFF_CATEGORIES}
    seen_thing_ids = set()
    for ann in panoptic['annotations']:
        pan = np.asarray(Image.open(os.path.join(dataset['panoptic_dir'], ann['file_name'])))
        ids = rgb2id(pan)
        segment_ids = [s['id'] for s in ann['segments_info']]
        assert len(set(segment_ids)) == len(segment_ids)
        # Every pixel belongs to exactly one listed segment.
        assert set(np.unique(ids)) == set(segment_ids)
        for seg in ann['segments_info']:
            mask = ids == seg['id']
            assert seg['area'] == mask.sum()
            if seg['category_id'] in stuff_ids:
                assert seg['id'] not in by_id
                continue
            inst = by_id[seg['id']]  # thing segment id == instance annotation id
            assert inst['image_id'] == ann['image_id']
            assert inst['category_id'] == seg['category_id']
            assert np.array_equal(mask_util.decode(inst['segmentation']).astype(bool), mask)
            seen_thing_ids.add(seg['id'])
        stuff_contiguous = {c['id']: i + 1 for i, c in enumerate(STUFF_CATEGORIES)}
        semantic = np.asarray(Image.open(os.path.join(dataset['sem_seg_dir'], ann['file_name'])))
        assert np.array_equal(semantic, panoptic_to_semantic(ids, ann['segments_info'],
                                                             stuff_contiguous))
        assert set(np.unique(semantic)) <= {0, 1, 2, 3}
    assert seen_thing_ids == set(by_id)


def test_panoptic_quality_of_ground_truth_is_perfect(dataset, tmp_path):
    """The official panopticapi accepts the files, and the ground truth scores PQ 100 on itself."""
    from panopticapi.evaluation import pq_compute
    result = pq_compute(dataset['panoptic_json'], dataset['panoptic_json'],
                        dataset['panoptic_dir'], dataset['panoptic_dir'])
    assert result['All']['pq'] == pytest.approx(1.0)
    assert result['Things']['n'] == 3 and result['Stuff']['n'] >= 2


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_images'):
        write_synthetic_coco('/tmp/unused', num_images=0)
    with pytest.raises(ValueError, match='image_size'):
        write_synthetic_coco('/tmp/unused', image_size=(8, 8))


@pytest.mark.detectron2
def test_register_and_load_with_detectron2(dataset, tmp_path):
    pytest.importorskip('detectron2')
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2_ext.data import register_synthetic_dataset

    root = os.path.dirname(os.path.dirname(dataset['instances_json']))
    names = register_synthetic_dataset('synthetic_test_reg', root, 'train')
    assert names == dict(instances='synthetic_test_reg', panoptic='synthetic_test_reg_panoptic')
    register_synthetic_dataset('synthetic_test_reg', root, 'train')  # same again: a no-op

    meta = MetadataCatalog.get('synthetic_test_reg_panoptic')
    assert meta.thing_classes == ['circle', 'square', 'triangle']
    assert meta.stuff_classes == ['things', 'sky', 'ground', 'water']
    assert meta.evaluator_type == 'coco_panoptic_seg'
    assert MetadataCatalog.get('synthetic_test_reg').evaluator_type == 'coco'

    dicts = DatasetCatalog.get('synthetic_test_reg_panoptic')
    assert len(dicts) == NUM_IMAGES and all(os.path.isfile(d['sem_seg_file_name']) for d in dicts)
    mapper = DatasetMapper(is_train=True, augmentations=[T.NoOpTransform()], image_format='BGR',
                           use_instance_mask=True, instance_mask_format='bitmask')
    sample = mapper(dicts[0])
    assert sample['image'].shape[1:] == (96, 112)
    assert sample['sem_seg'].shape == (96, 112)
    assert len(sample['instances']) == len(dicts[0]['annotations'])
    assert sample['instances'].gt_masks.tensor.shape[1:] == (96, 112)


@pytest.mark.detectron2
def test_register_errors(dataset, tmp_path):
    pytest.importorskip('detectron2')
    from detectron2_ext.data import (
        register_coco_instances_dataset, register_coco_panoptic_dataset,
        register_synthetic_dataset,
    )
    with pytest.raises(FileNotFoundError, match='does-not-exist.json.*--coco-dataset'):
        register_coco_instances_dataset('x_missing', str(tmp_path / 'does-not-exist.json'),
                                        dataset['image_dir'])
    with pytest.raises(FileNotFoundError, match='Image directory'):
        register_coco_instances_dataset('x_missing', dataset['instances_json'],
                                        str(tmp_path / 'no-images'))
    with pytest.raises(FileNotFoundError, match='Panoptic PNG directory'):
        register_coco_panoptic_dataset('x_missing', dataset['image_dir'], str(tmp_path / 'nope'),
                                       dataset['panoptic_json'], dataset['instances_json'])
    with pytest.raises(FileNotFoundError, match='write_synthetic_coco'):
        register_synthetic_dataset('x_missing', str(tmp_path), 'train')
    # malformed panoptic json: one line naming what is missing, before any PNG is written
    with open(dataset['panoptic_json']) as f:
        good = json.load(f)
    for broken, message in (
            ({k: v for k, v in good.items() if k != 'annotations'}, "no 'annotations' list"),
            ({**good, 'annotations': [{'file_name': 'a.png'}]}, r"Annotation 0 .* lacks \['segments_info'\]"),
            ({**good, 'annotations': [{'file_name': 'a.png', 'segments_info': [{'id': 1, 'category_id': 999}]}]},
             "'category_id' listed in 'categories'")):
        path = tmp_path / 'broken_panoptic.json'
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message) as err:
            register_coco_panoptic_dataset('x_broken', dataset['image_dir'], dataset['panoptic_dir'],
                                           str(path), dataset['instances_json'],
                                           sem_seg_dir=str(tmp_path / 'never_written'))
        assert '\n' not in str(err.value)
        assert not (tmp_path / 'never_written').exists()
    register_coco_instances_dataset('x_twice', dataset['instances_json'], dataset['image_dir'])
    other = write_synthetic_coco(str(tmp_path / 'other'), num_images=1)
    with pytest.raises(ValueError, match='already registered'):
        register_coco_instances_dataset('x_twice', other['instances_json'], other['image_dir'])


@pytest.mark.detectron2
def test_panoptic_registration_writes_missing_semantic_pngs(dataset, tmp_path):
    """User panoptic data without semantic PNGs: they are derived from the panoptic PNGs."""
    pytest.importorskip('detectron2')
    from detectron2.data import DatasetCatalog
    from detectron2_ext.data import register_coco_panoptic_dataset

    sem_dir = tmp_path / 'semseg'
    register_coco_panoptic_dataset('x_user_panoptic', dataset['image_dir'],
                                   dataset['panoptic_dir'], dataset['panoptic_json'],
                                   dataset['instances_json'], sem_seg_dir=str(sem_dir))
    assert len(os.listdir(sem_dir)) == NUM_IMAGES
    for name in os.listdir(sem_dir):
        assert filecmp.cmp(sem_dir / name, os.path.join(dataset['sem_seg_dir'], name),
                           shallow=False)
    assert len(DatasetCatalog.get('x_user_panoptic')) == NUM_IMAGES
