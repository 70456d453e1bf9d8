"""detectron2's ``DatasetMapper`` with images decoded by :func:`maformer_zoo.data.decode_image`
(detectron2's PIL conversion clips 16-bit images to white); docs/training.md#image-decoding."""
import copy
from typing import Any, Dict

import numpy as np
import torch

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from maformer_zoo.data.images import decode_image

__all__ = ['DecodingDatasetMapper', 'read_image_rgb8']


def read_image_rgb8(file_name: str, format: str = 'RGB') -> np.ndarray:
    """An HWC uint8 image in ``format`` (detectron2's names: 'RGB', 'BGR', 'L'...), decoded by ours."""
    return utils.convert_PIL_to_numpy(decode_image(file_name), format)


class DecodingDatasetMapper(DatasetMapper):
    """``DatasetMapper`` (same constructor, ``from_config`` and outputs) whose images are decoded by ours."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        # detectron2's __call__ with the image reading replaced (it has no hook for it)
        record = copy.deepcopy(dataset_dict)
        image = read_image_rgb8(record['file_name'], self.image_format)
        utils.check_image_size(record, image)
        # label maps are class ids: detectron2's reader, never rescaled
        sem_seg = utils.read_image(record.pop('sem_seg_file_name'), 'L').squeeze(2) \
            if 'sem_seg_file_name' in record else None
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        shape = image.shape[:2]
        record['image'] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            record['sem_seg'] = torch.as_tensor(sem_seg.astype('long'))
        if self.proposal_topk is not None:
            utils.transform_proposals(record, shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            record.pop('annotations', None)
        elif 'annotations' in record:
            self._transform_annotations(record, transforms, shape)
        return record
