"""Semantic segmentation data as mmsegmentation's: the ADE20K training pipeline, and one label
reader for the start-up check, the training mapper and the evaluator (docs/segmentation.md)."""
import importlib.util
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.detectron2
pytest.importorskip('detectron2')

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor  # noqa: E402
from PIL import Image  # noqa: E402

from detectron2_ext import add_maformer_zoo_config  # noqa: E402
from detectron2_ext.data import (  # noqa: E402
    LabelFormat, read_label, read_raw_label, register_sem_seg_dataset, set_sem_seg_num_classes,
)
from detectron2_ext.data.sem_seg_mapper import CVResizeTransform, SemSegDatasetMapper  # noqa: E402
from detectron2_ext.engine.trainer import build_evaluator  # noqa: E402

from conftest import ROOT
SEMANTIC_DIR = os.path.join(ROOT, 'configs', 'ADE20K-SemanticSegmentation')
FAST_CONFIG = os.path.join(SEMANTIC_DIR, 'semantic_fpn_resnet18_mscsa_fpn_40k.yaml')


def _cfg(path=FAST_CONFIG, *opts):
    cfg = add_maformer_zoo_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.merge_from_list(['MODEL.TIMM.PRETRAINED', 'False', 'MODEL.DEVICE', 'cpu', *opts])
    return cfg


def _write_rgb(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _regions(h, w):
    """Left half class 1, right half class 2 on top and 3 below (mmseg's crop retry has work)."""
    label = np.full((h, w), 1, np.uint8)
    label[: h // 2, w // 2:] = 2
    label[h // 2:, w // 2:] = 3
    return label


def _max_share(label, ignore=255):
    values, counts = np.unique(label[label != ignore], return_counts=True)
    return counts.max() / counts.sum(), len(values)


def _some_crop_is_valid(label, crop=512, ratio=0.75):
    """Whether any crop position has >= 2 classes and none at >= ``ratio`` of the labelled
    pixels (all positions at once, from per-class integral images)."""
    h, w = label.shape
    ch, cw = min(crop, h), min(crop, w)
    counts = []
    for value in np.unique(label[label != 255]):
        integral = np.pad((label == value).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        counts.append(integral[ch:, cw:] - integral[:-ch, cw:] - integral[ch:, :-cw]
                      + integral[:-ch, :-cw])
    counts = np.stack(counts)
    total = counts.sum(0)
    valid = ((counts > 0).sum(0) > 1) & (counts.max(0) < ratio * total)
    return bool(valid.any())


def test_training_mapper_is_mmsegs_ade20k_pipeline(tmp_path):
    """A 683x512 image through the training mapper 50 times (seeded): every output is 512x512,
    the resize ratio (output height / 512) spreads over 0.5-2.0 as a uniform draw does
    (Kolmogorov-Smirnov distance < 0.19, the 5% critical value at n = 50) with the aspect kept,
    no crop has one class at >= 75% where a crop without was possible, and padding is ignore
    (label) / the pixel mean (image).

    Catches: detectron2's crop-then-resize order (outputs 265..933 px), a ratio range of 0.5-1.0
    or a short side fitted to 512 regardless of the ratio, cat_max_ratio off (1.0), padding with
    0 instead of the mean or with class 0 instead of ignore."""
    _write_rgb(tmp_path / 'img.png', 512, 683)
    Image.fromarray(_regions(512, 683)).save(tmp_path / 'label.png')
    cfg = _cfg()
    mapper = SemSegDatasetMapper(cfg, True)
    record = dict(file_name=str(tmp_path / 'img.png'), sem_seg_file_name=str(tmp_path / 'label.png'))
    label = read_label(record['sem_seg_file_name'])
    np.random.seed(0)
    ratios, avoidable = [], 0
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1)
    for _ in range(50):
        out = mapper(record)
        assert out['image'].shape == (3, 512, 512) and out['sem_seg'].shape == (512, 512)
        resize = next(t for t in out['transforms'] if isinstance(t, CVResizeTransform))
        ratios.append(resize.new_h / 512)
        assert abs(resize.new_w - 683 * resize.new_h / 512) <= 1
        if resize.new_h < 512:  # padded rows
            assert (out['sem_seg'][resize.new_h:] == 255).all()
            assert torch.equal(out['image'][:, resize.new_h:, 0], mean.expand(3, 512 - resize.new_h))
        share, n = _max_share(out['sem_seg'].numpy())
        if n < 2 or share >= 0.75:
            avoidable += _some_crop_is_valid(resize.apply_segmentation(label))
    assert avoidable == 0
    ratios = np.sort(ratios)
    assert ratios.min() >= 0.5 and ratios.max() <= 2.0
    uniform = (ratios - 0.5) / 1.5
    steps = np.arange(1, 51) / 50
    ks = max(np.max(steps - uniform), np.max(uniform - (steps - 1 / 50)))
    assert ks < 0.19, ks


def test_test_mapper_fits_2048x512_without_crop(tmp_path):
    """Test: the image resized to fit 2048x512 (683x512 stays, 300x1000 (portrait) -> 512x1707, 4000x200 -> 2048x102:
    portrait sides fitted as a landscape image's), no crop, no label read."""
    mapper = SemSegDatasetMapper(_cfg(), False)
    for (h, w), expected in (((512, 683), (512, 683)), ((1000, 300), (1707, 512)),
                             ((200, 4000), (102, 2048))):
        _write_rgb(tmp_path / 'img.png', h, w)
        out = mapper(dict(file_name=str(tmp_path / 'img.png'), sem_seg_file_name='unused.png'))
        assert tuple(out['image'].shape[1:]) == expected and 'sem_seg' not in out


def _palette_png(path, indices):
    """A palette PNG whose colours' luminance is not the index (index i: grey 255 - 40 i)."""
    image = Image.fromarray(indices.astype(np.uint8), mode='P')
    palette = []
    for i in range(256):
        palette += [max(255 - 40 * i, 0)] * 3
    image.putpalette(palette)
    image.save(path)


def _label_files(root):
    """Four one-image datasets: palette, 8-bit, 16-bit (ignore 65535) and reduce_zero_label,
    with their expected training labels."""
    h, w = 32, 48
    grid = np.indices((h, w)).sum(0) // 8
    cases = {}
    specs = {
        'pal': (np.array([0, 1, 2, 5])[grid % 4], (), None),
        'l8': (np.array([0, 3, 255, 7])[grid % 4], (), None),
        'l16': (np.array([0, 300, 65535, 4])[grid % 4], ('ignore_label=65535',), None),
        'rzl': (np.array([0, 1, 2, 6])[grid % 4], ('reduce_zero_label',), None),
    }
    for name, (values, options, _) in specs.items():
        image_dir, label_dir = root / name / 'images', root / name / 'labels'
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        _write_rgb(image_dir / 'a.png', h, w)
        if name == 'pal':
            _palette_png(label_dir / 'a.png', values)
        elif name == 'l16':
            Image.fromarray(values.astype(np.uint16)).save(label_dir / 'a.png')
        else:
            Image.fromarray(values.astype(np.uint8)).save(label_dir / 'a.png')
        expected = values.copy()
        if name == 'l16':
            expected[values == 65535] = 255
        if name == 'rzl':
            expected = np.where(values == 0, 255, values - 1)
        cases[name] = dict(image_dir=str(image_dir), label_dir=str(label_dir), options=options,
                           expected=expected, file=str(label_dir / 'a.png'))
    return cases


def test_reader_gives_indices_and_values(tmp_path):
    """Palette PNGs give indices (not luminance), 8/16-bit PNGs their values, then the format.
    Catches: reading palettes as 'L' (0, 40, 80, 200 -> 255, 215, 175, 55), 16-bit through 8."""
    cases = _label_files(tmp_path)
    formats = dict(pal=LabelFormat(), l8=LabelFormat(), l16=LabelFormat(ignore_label=65535),
                   rzl=LabelFormat(reduce_zero_label=True))
    for name, case in cases.items():
        assert np.array_equal(read_label(case['file'], formats[name]), case['expected']), name
    assert set(np.unique(read_raw_label(cases['pal']['file'])).tolist()) == {0, 1, 2, 5}
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'rgb.png')
    with pytest.raises(ValueError, match=r"is a RGB image: labels must be single-channel"):
        read_raw_label(str(tmp_path / 'rgb.png'))


@META_ARCH_REGISTRY.register()
class RecordingSegmentor(SemanticSegmentor):
    """detectron2's SemanticSegmentor that keeps every training input it is given (test only)."""
    seen = []

    def forward(self, batched_inputs):
        if self.training:
            RecordingSegmentor.seen.extend(batched_inputs)
        return super().forward(batched_inputs)


def _train_net_module():
    spec = importlib.util.spec_from_file_location('train_net_for_tests',
                                                  os.path.join(ROOT, 'scripts', 'train_net.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~15 s idle, 35 s on a shared CPU; the fast paths: the reader and evaluator tests
def test_train_net_trains_on_the_labels_in_the_files(tmp_path):
    """Palette, 8-bit, 16-bit (ignore_label=65535, class 300) and reduce_zero_label datasets
    train 2 iterations (batch 2: each image once) through train_net.py's --sem-seg-dataset, and
    the label the model gets is the file's (after the format) moved by the recorded resize /
    crop / flip. Catches: luminance reading of palettes, 16-bit values clipped to 255, no
    reduce_zero_label, the evaluator or mapper reading another way."""
    cases = _label_files(tmp_path / 'data')
    args = []
    for name, case in cases.items():
        args += ['--sem-seg-dataset', name, case['image_dir'], case['label_dir'], *case['options']]
    train_net = _train_net_module()
    RecordingSegmentor.seen.clear()
    code = train_net.cli([
        '--config-file', FAST_CONFIG, *args,
        'DATASETS.TRAIN', str(tuple(cases)), 'DATASETS.TEST', '()', 'TEST.EVAL_PERIOD', '0',
        'MODEL.META_ARCHITECTURE', 'RecordingSegmentor', 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '301',
        'MODEL.TIMM.PRETRAINED', 'False', 'MODEL.TIMM.NORM', 'BN', 'MODEL.SEM_SEG_HEAD.NORM', 'BN',
        'MODEL.DEVICE', 'cpu', 'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.MAX_ITER', '2',
        'INPUT.CROP.SIZE', '(32, 32)', 'INPUT.SEM_SEG_SCALE', '(96, 32)',
        'DATALOADER.NUM_WORKERS', '0', 'OUTPUT_DIR', str(tmp_path / 'out')])
    assert code == 0
    seen = {os.path.basename(os.path.dirname(os.path.dirname(d['file_name']))): d
            for d in RecordingSegmentor.seen}
    assert sorted(seen) == sorted(cases)
    for name, case in cases.items():
        expected = seen[name]['transforms'].apply_segmentation(case['expected'].astype(np.int32))
        got = seen[name]['sem_seg'].numpy()
        assert np.array_equal(got[:expected.shape[0], :expected.shape[1]], expected), name
    assert 300 in seen['l16']['sem_seg'] and 254 not in seen['rzl']['sem_seg']


def test_evaluator_reads_through_the_reader(tmp_path):
    """The evaluator's ground truth is the reader's, with the dataset's format (detectron2's
    default would read the palette as values and 65535 / 0 unchanged)."""
    cases = _label_files(tmp_path)
    from detectron2.data import MetadataCatalog
    cfg = _cfg(FAST_CONFIG, 'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '301', 'OUTPUT_DIR', str(tmp_path / 'ev'))
    for name, case in cases.items():
        name = 'ev_' + name
        register_sem_seg_dataset(name, case['image_dir'], case['label_dir'], *case['options'])
        set_sem_seg_num_classes(name, 301)
        evaluator = build_evaluator(cfg, name)._evaluators[0]
        assert np.array_equal(evaluator.sem_seg_loading_fn(case['file'], dtype=int), case['expected'])
        assert MetadataCatalog.get(name).ignore_label == 255


def _dataset(root, name, values, size=(16, 16), image_size=None):
    (root / name / 'images').mkdir(parents=True)
    (root / name / 'labels').mkdir(parents=True)
    _write_rgb(root / name / 'images' / 'a.png', *(image_size or size))
    dtype = np.uint16 if max(values) > 255 else np.uint8
    label = np.resize(np.asarray(values, dtype), size[0] * size[1]).reshape(size)
    Image.fromarray(label).save(root / name / 'labels' / 'a.png')
    return str(root / name / 'images'), str(root / name / 'labels')


@pytest.mark.parametrize('values,options,num_classes,advice', [
    ([0, 1, 2, 3, 4], (), 4, r"the labels run 0..4: .* read them with reduce_zero_label .*; if 0..4 "
                             r"are all classes, set MODEL.SEM_SEG_HEAD.NUM_CLASSES 5\."),
    ([0, 1, 2, 65535], (), 4, r"if 65535 marks unlabelled pixels, give it as the ignore value "
                              r"\(.* ignore_label=65535\)"),
    ([0, 1, 2, 5, 6], (), 4, r"set MODEL.SEM_SEG_HEAD.NUM_CLASSES 7 "),
    ([0, 1, 2, 5, 6], ('reduce_zero_label',), 4, r"after reduce_zero_label.*NUM_CLASSES 6 "),
])
def test_check_names_the_fix(tmp_path, values, options, num_classes, advice):
    """Out-of-range labels: the start-up check names the fix that fits (ADE's raw 0..150 with
    150 classes -> reduce_zero_label; one far value -> ignore value; else NUM_CLASSES), in one
    line. Catches: the old "raise NUM_CLASSES" for every case, a count that forgets the shift."""
    name = f'fix_{len(values)}_{values[-1]}_{len(options)}'
    register_sem_seg_dataset(name, *_dataset(tmp_path, name, values), *options)
    with pytest.raises(ValueError, match=advice) as info:
        set_sem_seg_num_classes(name, num_classes)
    assert '\n' not in str(info.value)


def test_check_accepts_what_the_fix_says(tmp_path):
    """After the advised fix the same files pass (no error), and the training labels are the fix's:
    reduce_zero_label maps 0 to 255 and shifts the rest down; ignore_label=65535 becomes 255.
    Mutation caught: the flag not stored with the dataset (labels read as the raw values)."""
    from detectron2_ext.data.sem_seg import label_format_of
    a = _dataset(tmp_path, 'ok_rzl', [0, 1, 2, 3, 4])
    register_sem_seg_dataset('ok_rzl', *a, 'reduce_zero_label')
    set_sem_seg_num_classes('ok_rzl', 4)
    b = _dataset(tmp_path, 'ok_ign', [0, 1, 2, 65535])
    register_sem_seg_dataset('ok_ign', *b, 'ignore_label=65535')
    set_sem_seg_num_classes('ok_ign', 4)
    rzl = read_label(os.path.join(a[1], 'a.png'), label_format_of('ok_rzl'))
    assert rzl.ravel()[:5].tolist() == [255, 0, 1, 2, 3]
    ign = read_label(os.path.join(b[1], 'a.png'), label_format_of('ok_ign'))
    assert ign.ravel()[:4].tolist() == [0, 1, 2, 255]


def test_size_mismatch_is_one_line_at_start_up(tmp_path):
    """An image and label of different sizes stop train_net.py before training, in one line naming
    both files (was: a bare AssertionError from the resize transform during training)."""
    images, labels = _dataset(tmp_path, 'mismatch', [0, 1], size=(16, 16), image_size=(16, 20))
    train_net = _train_net_module()
    args = train_net.build_argument_parser().parse_args([
        '--config-file', FAST_CONFIG, '--sem-seg-dataset', 'mismatch', images, labels,
        'DATASETS.TRAIN', '("mismatch",)', 'DATASETS.TEST', '()', 'MODEL.DEVICE', 'cpu',
        'MODEL.SEM_SEG_HEAD.NUM_CLASSES', '2', 'OUTPUT_DIR', str(tmp_path / 'out')])
    with pytest.raises(ValueError) as info:
        train_net.build_config(args)
    message = str(info.value)
    assert '\n' not in message
    assert (f"image '{images}/a.png' is 20x16 but its label '{labels}/a.png' is 16x16"
            in message), message


def test_sem_seg_dataset_flag_rejects_unknown_options(tmp_path):
    images, labels = _dataset(tmp_path, 'opts', [0, 1])
    with pytest.raises(ValueError, match=r"unknown option 'reduce'; .* 'reduce_zero_label' and "
                                         r"'ignore_label=N'"):
        register_sem_seg_dataset('opts', images, labels, 'reduce')
