"""Detectors exported as detectron2's ``tools/deploy/export_model.py`` does (TorchScript by ``TracingAdapter``
or ``scripting_with_instances``, ONNX by tracing; height and width dynamic) and compared with eager. What and
why: docs/detectron2.md#deploying-detectors-scriptsexport_detectorpy-detectron2_extexportpy.
"""
import os
from typing import Callable, Dict, List, NamedTuple

import torch
from torch import Tensor, nn

from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.export.flatten import flatten_to_tuple
from detectron2.modeling import GeneralizedRCNN, PanopticFPN
from detectron2.structures import Boxes

from maformer_zoo.utils.atomic import atomic_write

FORMATS = ('torchscript', 'onnx')
METHODS = ('tracing', 'scripting')
_FILES = {'torchscript': 'model.ts', 'onnx': 'model.onnx'}
# Instances fields a scripted detector may carry, with their types (detectron2's deploy list)
SCRIPTED_FIELDS = {'proposal_boxes': Boxes, 'objectness_logits': Tensor, 'pred_boxes': Boxes, 'scores': Tensor,
                   'pred_classes': Tensor, 'pred_masks': Tensor, 'pred_keypoints': Tensor,
                   'pred_keypoint_heatmaps': Tensor}


def check_output_dir(path: str) -> None:
    """Refuse an existing, non-empty ``path`` (another run's folder is never overwritten) in one line."""
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(
            f"Output folder '{path}' exists and is not empty; give a new or empty --output folder.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"--output '{path}' is a file; give a folder path.")


def check_exportable(model: nn.Module, fmt: str, method: str) -> None:
    """Refuse a format / method / architecture combination that has no export path."""
    if fmt not in FORMATS or method not in METHODS:
        raise ValueError(f'format {fmt!r}, export method {method!r}: choose one of {FORMATS} and of {METHODS}.')
    if method == 'scripting' and fmt != 'torchscript':
        raise ValueError('scripting exports TorchScript only; use --export-method tracing for ONNX.')
    if method == 'scripting' and (isinstance(model, PanopticFPN) or not isinstance(model, GeneralizedRCNN)):
        raise ValueError(f"scripting exports R-CNNs (Mask / Cascade Mask / Faster R-CNN); use "
                         f"--export-method tracing for {type(model).__name__}.")


def _traced_outputs(model: nn.Module, inputs: List[Dict[str, Tensor]]):
    """Outputs before the resize to the original image size (as detectron2's tracing export) and
    before Panoptic FPN's merge, whose per-instance loop a trace would freeze."""
    if isinstance(model, PanopticFPN):
        instances, sem_seg = model.inference(inputs, do_postprocess=False)
        return instances, sem_seg[0]
    if isinstance(model, GeneralizedRCNN):
        return model.inference(inputs, do_postprocess=False)
    return model(inputs)  # SemanticSegmentor, RetinaNet


class _ScriptableRCNN(nn.Module):
    """R-CNN inference returning dicts of fields (a scripted ``Instances`` cannot leave TorchScript),
    detectron2's ``ScriptableAdapter`` of ``export_model.py``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        return [i.get_fields() for i in self.model.inference(inputs, do_postprocess=False)]


def _adapter(model: nn.Module, image: Tensor, method: str) -> nn.Module:
    if method == 'scripting':
        return _ScriptableRCNN(model).eval()
    return TracingAdapter(model, [{'image': image}], _traced_outputs).eval()


class ExportedDetector(NamedTuple):
    """An exported detector on disk; ``run`` and ``eager`` give its and the eager model's outputs on
    one ``(3, H, W)`` image, flattened alike."""
    path: str
    run: Callable[[Tensor], List[Tensor]]
    eager: Callable[[Tensor], List[Tensor]]


def export_detector(model: nn.Module, image: Tensor, output_dir: str, fmt: str = 'torchscript',
                    method: str = 'tracing', opset: int = 17) -> ExportedDetector:
    """Export ``model`` into ``output_dir`` (created; refused if not empty), traced on ``image`` (a ``(3, H, W)``
    input as ``DefaultPredictor`` makes it); ``method``: ``'tracing'`` or ``'scripting'`` (TorchScript only);
    ``opset``: the ONNX opset (FINE's attention needs >= 14)."""
    check_exportable(model, fmt, method)
    check_output_dir(output_dir)
    adapter = _adapter(model, image, method)
    os.makedirs(output_dir, exist_ok=True)
    with torch.no_grad(), atomic_write(os.path.join(output_dir, _FILES[fmt])) as f:
        if method == 'scripting':
            torch.jit.save(scripting_with_instances(adapter, SCRIPTED_FIELDS), f)
        elif fmt == 'torchscript':  # check_trace would run the model twice more; max_difference checks
            torch.jit.save(torch.jit.trace(adapter, (image,), check_trace=False), f)
        else:
            torch.onnx.export(adapter, (image,), f, dynamo=False, opset_version=opset, input_names=['image'],
                              output_names=[f'output{i}' for i in range(len(adapter(image)))],
                              dynamic_axes={'image': {1: 'height', 2: 'width'}})
    return load_exported(model, image, output_dir, fmt, method)


def load_exported(model: nn.Module, image: Tensor, output_dir: str, fmt: str = 'torchscript',
                  method: str = 'tracing') -> ExportedDetector:
    """The file :func:`export_detector` wrote from ``model`` and ``image`` (same arguments)."""
    path = os.path.join(output_dir, _FILES[fmt])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No exported model at '{path}'; run the export first.")
    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])

        def program(x: Tensor) -> List[Tensor]:
            return [torch.from_numpy(o) for o in session.run(None, {'image': x.numpy()})]
    else:
        program = torch.jit.load(path)

    def flat(module: Callable) -> Callable[[Tensor], List[Tensor]]:
        def run(x: Tensor) -> List[Tensor]:
            with torch.no_grad():
                return list(flatten_to_tuple(module([{'image': x}] if method == 'scripting' else x))[0])
        return run
    return ExportedDetector(path, flat(program), flat(_adapter(model, image, method)))


def max_difference(exported: ExportedDetector, image: Tensor) -> float:
    """Largest absolute difference of the exported and the eager outputs on ``image``; ``inf`` when
    their shapes differ (e.g. another number of detections)."""
    got, want = exported.run(image), exported.eager(image)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float('inf')
    return max([(a.double() - b.double()).abs().max().item() for a, b in zip(got, want) if a.numel()], default=0.0)
