#!/usr/bin/env python3
"""Real-data check of the training and validation scripts: Fashion-MNIST, a small MSCSA model.

Fashion-MNIST (MIT licence; 60k train / 10k test, 28x28 grayscale, 10 classes) comes from the
Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts the IDX
files in ``/usr/share/datasets/fashion-mnist/``). This script

1. writes a class-balanced subset (``--train-per-class`` / ``--test-per-class``, 0 = all) as an
   image folder (``<out>/data/{train,test}/<class>/<index>.png``), the layout users fine-tune on;
2. trains ``--model`` from scratch at ``--img-size`` with one input channel, through the same
   :func:`maformer_zoo.training.train` that ``scripts/train_imagenet.py`` runs;
3. evaluates the final weights on the test folder through :func:`maformer_zoo.training.validate`
   (what ``scripts/validate.py`` runs), and writes ``<out>/results.json``.

Example (the run in the README, about 10 minutes on 2 CPU cores)::

    python benchmarks/fashion_mnist.py --out output/fashion_mnist
    python benchmarks/fashion_mnist.py --tiny --out /tmp/fm   # every code path in seconds (CI)
"""
import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
from PIL import Image
import torch
from timm.utils import setup_default_logging

import maformer_zoo  # noqa: F401  (registers our models with timm)
from maformer_zoo.training import EvalConfig, TrainConfig, train, validate

CLASS_NAMES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
               'ankle_boot')
# Mean / std of the Fashion-MNIST training images (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian header, then uint8 data) as a numpy array."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_image_folder(source: str, prefix: str, folder: str, per_class: int) -> int:
    """Write the first ``per_class`` images of each class (all if 0) as PNGs; returns the count."""
    images = read_idx(os.path.join(source, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(source, f'{prefix}-labels-idx1-ubyte.gz'))
    written = 0
    for label, name in enumerate(CLASS_NAMES):
        class_dir = os.path.join(folder, f'{label}_{name}')
        os.makedirs(class_dir, exist_ok=True)
        indices = np.flatnonzero(labels == label)
        if per_class:
            indices = indices[:per_class]
        for index in indices:
            path = os.path.join(class_dir, f'{index:05d}.png')
            if not os.path.exists(path):
                Image.fromarray(images[index], mode='L').save(path)
            written += 1
    return written


def write_tiny_idx(folder: str, seed: int) -> str:
    """Write a stand-in of Fashion-MNIST's four IDX files (random 28x28 images, 4 train and 2 test
    per class) for ``--tiny``; returns the folder."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, per_class in (('train', 4), ('t10k', 2)):
        labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for kind, array in (('images-idx3', images), ('labels-idx1', labels)):
            header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
            with gzip.open(os.path.join(folder, f'{prefix}-{kind}-ubyte.gz'), 'wb') as f:
                f.write(header + array.tobytes())
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--source', default='/usr/share/datasets/fashion-mnist')
    parser.add_argument('--out', default='output/fashion_mnist')
    parser.add_argument('--model', default='resnet18_mscsa')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--train-per-class', type=int, default=120, help='0 = all 6000')
    parser.add_argument('--test-per-class', type=int, default=100, help='0 = all 1000')
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=40)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--num-workers', type=int, default=1)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--tiny', action='store_true',
                        help='a seconds-long run of every code path (CI, no dataset needed): a '
                             'generated stand-in in Fashion-MNIST\'s IDX format (4 + 2 images per '
                             'class), 32 px, 1 epoch; the accuracy means nothing')
    args = parser.parse_args(argv)
    setup_default_logging()
    if args.tiny:
        args.source = write_tiny_idx(os.path.join(args.out, 'tiny_idx'), args.seed)
        args.train_per_class, args.test_per_class, args.img_size = 4, 2, 32
        args.epochs, args.batch_size, args.num_workers = 1, 8, 0

    if not os.path.isfile(os.path.join(args.source, 'train-images-idx3-ubyte.gz')):
        print(f"error: no Fashion-MNIST in '{args.source}'. Install it with "
              "`sudo apt-get install dataset-fashion-mnist` or pass --source.", file=sys.stderr)
        return 2
    data_dir = os.path.join(args.out, 'data')
    tag = f'train{args.train_per_class}-test{args.test_per_class}'
    data_dir = os.path.join(data_dir, tag)
    n_train = write_image_folder(args.source, 'train', os.path.join(data_dir, 'train'), args.train_per_class)
    n_test = write_image_folder(args.source, 't10k', os.path.join(data_dir, 'test'), args.test_per_class)

    cfg = TrainConfig(
        model=args.model, data_dir=data_dir, val_split='', input_img_mode='L', in_chans=1,
        img_size=args.img_size, mean=[FASHION_MNIST_MEAN], std=[FASHION_MNIST_STD], interpolation='bilinear',
        crop_pct=1.0, train_interpolation='bilinear', scale=[0.6, 1.0], ratio=[0.8, 1.25], color_jitter=0.0,
        reprob=0.1, smoothing=0.1, opt='adamw', lr=args.lr, weight_decay=0.05, batch_size=args.batch_size,
        epochs=args.epochs, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5, num_workers=args.num_workers,
        seed=args.seed, output=args.out, experiment=f'{args.model}-{args.img_size}px-{tag}-e{args.epochs}',
        progress=False, log_interval=20)
    started = time.perf_counter()
    summary = train(cfg)
    train_seconds = time.perf_counter() - started
    checkpoint = os.path.join(summary['run_dir'], 'last.pth')
    results = validate(EvalConfig(model=args.model, checkpoint=checkpoint, data_dir=data_dir, split='test',
                                  input_img_mode='L', in_chans=1, num_workers=args.num_workers,
                                  batch_size=100, progress=False))
    report = {
        'command': 'python benchmarks/fashion_mnist.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        'model': args.model, 'img_size': args.img_size, 'train_images': n_train, 'test_images': n_test,
        'epochs': args.epochs, 'optimizer_steps': summary['optimizer_steps'],
        'final_train_loss': round(summary['train']['loss'], 4), 'train_seconds': round(train_seconds, 1),
        'train_img_per_s': round(summary['train']['img_per_s'], 1), 'test_top1': results['top1'],
        'test_top5': results['top5'], 'test_loss': results['loss'], 'params_m': results['param_count_m'],
        'torch_threads': torch.get_num_threads(), 'checkpoint': checkpoint,
    }
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
