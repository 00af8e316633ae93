"""What an image becomes on its way to the model: the recipe's CPU transforms (timm's, in loader workers) and
OnDevice, which finishes the batch on the device (normalize, mixup/cutmix, cast).
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256  # resize 256, center-crop 224; scales with --img-size


# Workers hand uint8 CHW images to the trainer (timm's `use_prefetcher` transforms: no float conversion or
# normalization in the worker, a quarter of the bytes through shared memory); OnDevice normalizes them.
def train_transform(img_size: int, auto_augment: str | None):
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, auto_augment=auto_augment, interpolation="bilinear",
                            re_prob=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, use_prefetcher=True)


def eval_transform(img_size: int):
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, crop_pct=EVAL_CROP_PCT, interpolation="bilinear",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, use_prefetcher=True)


class OnDevice:
    """A batch from the workers (uint8 NCHW images, int labels) -> the model's input on the device: copied
    (from pinned memory, non-blocking), converted to float and normalized there as timm's GPU prefetcher
    does, mixed (mixup/cutmix, training only), then cast to the precision's input dtype."""

    def __init__(self, device, dtype, mixup=None):
        self.device, self.dtype, self.mixup = device, dtype, mixup
        self.mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in IMAGENET_STD], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        y = labels.to(self.device, non_blocking=True)
        if self.mixup:
            x, y = self.mixup(x, y)
        return x.to(self.dtype), y
