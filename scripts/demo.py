#!/usr/bin/env python
"""`make demo`: train Mask R-CNN with an MSCSA backbone and FINE-FPN on generated scenes, on the CPU.

    python scripts/demo.py                       # the demo: about 6 minutes on 2 idle cores
    python scripts/demo.py --max-iter 50 SOLVER.BASE_LR 0.002   # shorter, or any KEY VALUE

With nothing downloaded, it

1. writes a small COCO-format dataset of procedural scenes (``detectron2_ext.data``);
2. trains ``configs/demo/mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml`` on it from random
   initialisation, for the config's fixed number of iterations, with a progress bar;
3. evaluates box and mask AP on the validation split (detectron2's ``COCOEvaluator``);
4. draws ground truth and predictions of a few validation images (detectron2's ``Visualizer``);
5. prints where everything went.

The run is seeded (data, weights, data order), so two runs give the same AP; it uses at most 2
threads, so a busy machine makes it slower but not different. docs/demo.md has the details.
"""
import os

# Before torch is imported: OpenMP threads that spin while they wait steal the cores a neighbouring
# process needs (6x slower next to one, docs/demo.md); a short spin (libgomp's count) keeps nearly
# all of spinning's idle speed and sleeps soon enough. A user's own OpenMP setting wins.
if 'OMP_WAIT_POLICY' not in os.environ:
    os.environ.setdefault('GOMP_SPINCOUNT', '1000')

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'demo', 'mask_rcnn_resnet18_mscsa_fine_fpn_demo.yaml')
DEFAULT_OUTPUT = os.path.join('output', 'demo')


def _fresh_directory(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it holds an earlier run: never overwrite one."""
    candidate, n = path, 1
    while os.path.isdir(candidate) and os.listdir(candidate):
        n += 1
        candidate = f'{path}-{n}'
    return candidate


def _log_to_file(name: str, path: str) -> None:
    """Send logger ``name`` (and its children) to ``path`` only."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('[%(asctime)s] %(name)s %(levelname)s: %(message)s',
                                           datefmt='%m/%d %H:%M:%S'))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def _progress_hook(console):
    """A detectron2 hook that shows training progress, the loss and the ETA with tqdm; when
    training ends it says so on ``console``."""
    from detectron2.engine import HookBase
    from tqdm import tqdm

    class TrainingProgress(HookBase):
        def before_train(self):
            self.bar = tqdm(total=self.trainer.max_iter - self.trainer.start_iter, unit='it',
                            desc='[demo] training Mask R-CNN', dynamic_ncols=True)
            self.started = time.perf_counter()

        def after_step(self):
            self.bar.update(1)
            storage = self.trainer.storage
            if 'total_loss' in storage.histories():
                self.bar.set_postfix(loss=f"{storage.history('total_loss').median(10):.3f}",
                                     refresh=False)
            if self.trainer.iter + 1 >= self.trainer.max_iter:
                self.bar.close()
                self.seconds = time.perf_counter() - self.started
                print('[demo] evaluating box and mask AP on the validation images', file=console,
                      flush=True)

    return TrainingProgress()


def _draw_predictions(cfg, model, dataset_name: str, path: str, num_images: int,
                      score_threshold: float) -> None:
    """A grid: one row per image, ground truth left, predictions right."""
    from PIL import Image
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    metadata = MetadataCatalog.get(dataset_name)
    rows = []
    model.eval()
    for record in DatasetCatalog.get(dataset_name)[:num_images]:
        image = read_image(record['file_name'], format='RGB')
        model_input = image if cfg.INPUT.FORMAT == 'RGB' else image[:, :, ::-1]
        with torch.no_grad():
            instances = model([{'image': torch.as_tensor(model_input.transpose(2, 0, 1).copy()),
                                'height': image.shape[0], 'width': image.shape[1]}])[0]['instances']
        instances = instances.to('cpu')
        instances = instances[instances.scores >= score_threshold]
        truth = Visualizer(image, metadata, scale=2.0).draw_dataset_dict(record).get_image()
        pred = Visualizer(image, metadata, scale=2.0, instance_mode=ColorMode.IMAGE) \
            .draw_instance_predictions(instances).get_image()
        gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([truth, gap, pred], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# FINE's Fig. 8 is drawn at the l = 3 fusion: F_low at stride 8, detectron2's p3 (fpn_fine3)
FIG8_FINE = 'fine_backbone_fpn_fine3.png'


def _draw_fine_figures(cfg, model, out_dir: str) -> list:
    """The trained FINE neck's F_high, F_low, M and aligned F_low of every fusion (``FIG8_FINE``
    is the l = 3 one of FINE's Fig. 8) and the MSCSA attention, over the first validation image
    (``scripts/visualize.py`` draws the same, on the scales docs/segmentation.md describes)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2_ext.visualize import draw_detectron2_model

    image = read_image(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]['file_name'], format='RGB')
    return draw_detectron2_model(model, [image], out_dir, input_format=cfg.INPUT.FORMAT,
                                 size=cfg.INPUT.MIN_SIZE_TEST, erf=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config-file', default=DEFAULT_CONFIG)
    parser.add_argument('--output-dir', default=DEFAULT_OUTPUT,
                        help='where to write; if it holds an earlier run, <dir>-2, -3, ... is used')
    parser.add_argument('--max-iter', type=int, default=None,
                        help="training iterations (default: the config's SOLVER.MAX_ITER)")
    parser.add_argument('--num-train', type=int, default=96, help='generated training scenes')
    parser.add_argument('--num-val', type=int, default=24, help='generated validation scenes')
    parser.add_argument('--image-size', type=int, default=128,
                        help='shorter side of the generated scenes and of the model input')
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1),
                        help='torch threads (default: min(2, CPU cores); the AP depends on it '
                             'only by round-off)')
    parser.add_argument('opts', nargs=argparse.REMAINDER, help='KEY VALUE config overrides')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    out = os.path.abspath(_fresh_directory(args.output_dir))
    os.makedirs(out)
    # The log of every library (detectron2's environment, config and metrics every 20
    # iterations; warnings) goes to log.txt only: they are not the newcomer's business.
    log_file = os.path.join(out, 'log.txt')
    logging.captureWarnings(True)
    for name in ('detectron2', 'detectron2_ext', 'maformer_zoo', 'fvcore', 'py.warnings'):
        _log_to_file(name, log_file)
    try:
        import detectron2_ext
    except ImportError as err:
        print(f'[demo] needs detectron2 ({err}); `make setup` installs it.')
        return 1
    from detectron2_ext.config_file import load_config
    from detectron2.utils.env import seed_all_rng
    from detectron2_ext.data import register_synthetic_dataset, write_synthetic_coco
    from detectron2_ext.engine import Trainer
    from maformer_zoo.utils.atomic import write_atomic

    from detectron2_ext.config_file import UnsafeConfigError, UnknownConfigKeyError

    size = args.image_size
    overrides = ['OUTPUT_DIR', os.path.join(out, 'model'), 'INPUT.MIN_SIZE_TRAIN', f'({size},)',
                 'INPUT.MIN_SIZE_TEST', size]
    try:  # safe YAML; the file's keys and the command line's checked; one line for any config error
        if args.max_iter is not None:
            warmup = load_config(args.config_file, args.opts).SOLVER.WARMUP_ITERS
            overrides += ['SOLVER.MAX_ITER', args.max_iter, 'SOLVER.WARMUP_ITERS', min(warmup, args.max_iter)]
        cfg = load_config(args.config_file, overrides + args.opts)
    except (FileNotFoundError, ValueError, UnknownConfigKeyError, UnsafeConfigError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    cfg.freeze()
    from maformer_zoo.training.run_folder import check_run_folder
    try:  # an `OUTPUT_DIR` override must not name another run's folder
        check_run_folder(cfg.OUTPUT_DIR, f"OUTPUT_DIR '{cfg.OUTPUT_DIR}'", hint='give a new `OUTPUT_DIR <folder>`')
    except FileExistsError as err:
        print(f'[demo] error: {err}', file=sys.stderr)
        return 2

    data_root = os.path.join(out, 'data')
    image_size = (size, size * 5 // 4)
    for split, count in (('train', args.num_train), ('val', args.num_val)):
        write_synthetic_coco(data_root, num_images=count, image_size=image_size, seed=cfg.SEED,
                             split=split)
    register_synthetic_dataset(cfg.DATASETS.TRAIN[0], data_root, 'train')
    register_synthetic_dataset(cfg.DATASETS.TEST[0], data_root, 'val')
    print(f'[demo] wrote {args.num_train} + {args.num_val} scenes ({image_size[0]}x{image_size[1]}) '
          f'to {data_root}')

    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    write_atomic(os.path.join(cfg.OUTPUT_DIR, 'config.yaml'), cfg.dump())
    seed_all_rng(cfg.SEED)  # weights, data order and augmentation

    from maformer_zoo.errors import CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError, \
        UnsafeCheckpointError
    try:  # MODEL.WEIGHTS / MODEL.TIMM.CHECKPOINT overrides are read here
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
    except (CheckpointMismatchError, CorruptCheckpointError, PretrainedWeightsNotFoundError,
            UnsafeCheckpointError) as err:
        print(f'[demo] error: {str(err).splitlines()[0]}', file=sys.stderr)
        return 2
    progress = _progress_hook(sys.stdout)
    trainer.register_hooks([progress])
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f'[demo] Mask R-CNN, {cfg.MODEL.TIMM.NAME} + FINE-FPN, {params / 1e6:.1f}M parameters, '
          f'random init; {cfg.SOLVER.MAX_ITER} iterations of {cfg.SOLVER.IMS_PER_BATCH} images, '
          f'seed {cfg.SEED}, {args.threads} thread(s)')
    # pycocotools prints its AP tables: into the log with the rest.
    with open(log_file, 'a') as log, contextlib.redirect_stdout(log):
        results = trainer.train()
    train_seconds = progress.seconds
    eval_seconds = time.perf_counter() - started - train_seconds

    picture = os.path.join(out, 'predictions.png')
    _draw_predictions(cfg, trainer.model, cfg.DATASETS.TEST[0], picture, num_images=4,
                      score_threshold=0.5)
    figures = _draw_fine_figures(cfg, trainer.model, os.path.join(out, 'figures'))

    box, mask = results['bbox'], results['segm']
    iterations = cfg.SOLVER.MAX_ITER
    summary = dict(
        box_AP=round(box['AP'], 2), mask_AP=round(mask['AP'], 2), iterations=iterations,
        seconds_per_iteration=round(train_seconds / iterations, 3),
        threads=torch.get_num_threads(),  # what torch ran with, not what was asked
        minutes_total=round((time.perf_counter() - started) / 60, 2),
        load_average=os.getloadavg()[0] if hasattr(os, 'getloadavg') else None,
        results=results,
    )
    write_atomic(os.path.join(out, 'results.json'), json.dumps(summary, indent=2))
    print(f'[demo] trained {iterations} iterations in {train_seconds / 60:.1f} min '
          f'({train_seconds / iterations:.2f} s/iteration); evaluation and start-up '
          f'{eval_seconds:.0f} s')
    print('[demo] validation AP (COCO, %):')
    print(f'         box  AP {box["AP"]:5.1f}   AP50 {box["AP50"]:5.1f}   AP75 {box["AP75"]:5.1f}')
    print(f'         mask AP {mask["AP"]:5.1f}   AP50 {mask["AP50"]:5.1f}   AP75 {mask["AP75"]:5.1f}')
    print('[demo] outputs:')
    print(f'         dataset      {data_root}/{{train,val}}/ (images, instances.json, panoptic)')
    print(f'         config       {os.path.join(cfg.OUTPUT_DIR, "config.yaml")}')
    print(f'         checkpoint   {os.path.join(cfg.OUTPUT_DIR, "model_final.pth")}')
    print(f'         metrics      {os.path.join(cfg.OUTPUT_DIR, "metrics.json")}')
    print(f'         log          {log_file}')
    print(f'         results      {os.path.join(out, "results.json")}')
    print(f'         predictions  {picture} (left: ground truth, right: predictions >= 0.5)')
    print(f'         figures      {os.path.join(out, "figures")}/ ({len(figures)} PNGs: what the trained '
          f'FINE and MSCSA modules do, as drawn by scripts/visualize.py; {FIG8_FINE}: the l = 3 '
          f'fusion of FINE\'s Fig. 8)')
    print(f'[demo] done in {(time.perf_counter() - started) / 60:.1f} min')
    return 0


if __name__ == '__main__':
    sys.exit(main())
