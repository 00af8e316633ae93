"""What an image becomes on its way to the model: the recipe's CPU transforms (in loader workers), the `--aa`
policy they apply, and OnDevice, which finishes the batch on the device (normalize, mixup/cutmix, cast).

The train transform is FlagPerf's (`dataloaders/presets.py` of its ViT case, torchvision's classification
preset): RandomResizedCrop (bilinear), horizontal flip, torchvision's RandAugment(num_ops=2, magnitude=9,
num_magnitude_bins=31), and nothing else (no colour jitter, no random erasing). `--aa` swaps only the
augmentation step: another torchvision RandAugment strength (`ra-m5-n3`), one of timm's policies, or none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from vitbench.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 224 / 256  # resize 256, center-crop 224; scales with --img-size

FLAGPERF_POLICY = "ra"  # torchvision's RandAugment, 2 ops at magnitude 9 of 31 bins (FlagPerf: auto_augment="ra")
TORCHVISION_BINS = 31
TIMM_PREFIXES = ("rand", "augmix", "original", "v0", "3a")  # what timm's create_transform dispatches on
NO_POLICY = ("", "none")


class PolicyError(UserError):
    pass


@dataclass(frozen=True)
class AugmentPolicy:
    """`--aa`, parsed once: who implements it and at what strength."""

    text: str  # as given
    kind: str  # "torchvision" (RandAugment), "timm" (timm's policy string) or "none"
    num_ops: int | None = None  # torchvision: ops per image
    magnitude: int | None = None  # torchvision: bin in [0, bins - 1]; each op at magnitude / (bins - 1) of its range

    @classmethod
    def parse(cls, text: str | None) -> "AugmentPolicy":
        text = (text or "").strip()
        if text.lower() in NO_POLICY:
            return cls(text, "none")
        if m := re.fullmatch(r"ra((?:-[mn]\d+)*)", text):
            values = dict(re.findall(r"-([mn])(\d+)", m[1]))
            ops, magnitude = int(values.get("n", 2)), int(values.get("m", 9))
            if not (1 <= ops <= 14 and 0 <= magnitude < TORCHVISION_BINS):
                raise PolicyError(f"--aa {text}: torchvision's RandAugment takes n1..n14 ops and a magnitude bin "
                                  f"m0..m{TORCHVISION_BINS - 1}")
            return cls(text, "torchvision", ops, magnitude)
        if text.startswith(TIMM_PREFIXES):
            policy = cls(text, "timm")
            policy.transform(224)  # timm's parser refuses a malformed string now, not in a loader worker
            return policy
        raise PolicyError(f"--aa {text}: expected 'ra' (torchvision's RandAugment, 2 ops at magnitude 9 of 31: "
                          "FlagPerf's), 'ra-mM-nN', a timm policy ('rand-m9-mstd0.5', 'augmix-m5', 'original') or "
                          "'none'")

    def transform(self, img_size: int):
        """The augmentation step alone (a PIL image in and out), or None."""
        if self.kind == "torchvision":
            from torchvision.transforms import InterpolationMode, RandAugment

            return RandAugment(num_ops=self.num_ops, magnitude=self.magnitude, num_magnitude_bins=TORCHVISION_BINS,
                               interpolation=InterpolationMode.BILINEAR)
        if self.kind == "timm":
            from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
            from timm.data.transforms import str_to_pil_interp

            # the hyper-parameters timm's create_transform gives its policies
            hparams = dict(translate_const=int(img_size * 0.45), interpolation=str_to_pil_interp("bilinear"),
                           img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN))
            make = rand_augment_transform if self.text.startswith("rand") else \
                augment_and_mix_transform if self.text.startswith("augmix") else auto_augment_transform
            try:
                return make(self.text, hparams)
            except (AssertionError, KeyError, ValueError, IndexError) as e:
                raise PolicyError(f"--aa {self.text}: timm cannot parse this policy ({type(e).__name__}: {e})") \
                    from None
        return None


# Workers hand uint8 CHW images to the trainer (no float conversion or normalization in the worker, a quarter of
# the bytes through shared memory); OnDevice normalizes them.
def train_transform(img_size: int, policy: "AugmentPolicy | str | None"):
    """The worker's transform for a train image; POLICY: --aa's text (or parsed)."""
    from torchvision import transforms as T

    if not isinstance(policy, AugmentPolicy):
        policy = AugmentPolicy.parse(policy)
    augment = policy.transform(img_size)
    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(), *([augment] if augment else []), T.PILToTensor()])


def describe(transform) -> str:
    """A transform as one line of text (results.json's plan.recipe.train_transform)."""
    return re.sub(r"\s*\n\s*", " ", repr(transform)).strip()


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
