"""The train transform and `--aa`: FlagPerf's augmentation by default (torchvision's RandAugment, 2 ops at
magnitude 9 of 31 bins), checked against torchvision's own transforms on real photographs; timm's policies and
none on request; DALI's equivalent arguments. In-process, milliseconds."""

import pytest
import torch
from PIL import Image
from skimage import data
from torchvision import transforms as T

from vitbench.data import dali_loader
from vitbench.data.transforms import AugmentPolicy, PolicyError, describe, train_transform

PHOTOS = [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


def flagperf_transform(size: int):
    """FlagPerf's ViT train preset (its `dataloaders/presets.py`), up to the uint8 tensor our workers hand over."""
    bilinear = T.InterpolationMode.BILINEAR
    return T.Compose([T.RandomResizedCrop(size, interpolation=bilinear), T.RandomHorizontalFlip(0.5),
                      T.autoaugment.RandAugment(interpolation=bilinear, magnitude=9), T.PILToTensor()])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_default_train_transform_is_flagperfs_image_for_image(seed):
    ours, theirs = train_transform(224, AugmentPolicy.parse("ra")), flagperf_transform(224)
    for photo in PHOTOS:
        torch.manual_seed(seed)
        a = ours(photo)
        torch.manual_seed(seed)
        b = theirs(photo)
        assert a.dtype == torch.uint8 and a.shape == (3, 224, 224)
        assert torch.equal(a, b)


def test_the_default_applies_torchvisions_ops_at_magnitude_9_of_31_and_nothing_else():
    steps = train_transform(224, AugmentPolicy.parse("ra")).transforms
    assert [type(t).__name__ for t in steps] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment",
                                                 "PILToTensor"]  # no colour jitter, no random erasing
    ra = steps[2]
    assert (ra.num_ops, ra.magnitude, ra.num_magnitude_bins) == (2, 9, 31)
    space = ra._augmentation_space(ra.num_magnitude_bins, (224, 224))
    assert len(space) == 14 and "Invert" not in space and "SolarizeAdd" not in space
    rotate, signed = space["Rotate"]
    assert float(rotate[ra.magnitude]) == pytest.approx(9.0) and signed  # 9/30 of torchvision's 30 degrees
    assert "num_ops=2, magnitude=9, num_magnitude_bins=31" in describe(train_transform(224, AugmentPolicy.parse("ra")))


def test_timm_policies_and_none_stay_selectable_and_differ_from_the_default():
    timm = train_transform(224, AugmentPolicy.parse("rand-m9-mstd0.5"))
    assert type(timm.transforms[2]).__module__.startswith("timm.") and "mstd=0.5" in describe(timm)
    none = train_transform(224, AugmentPolicy.parse("none"))
    assert [type(t).__name__ for t in none.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    assert AugmentPolicy.parse("") == AugmentPolicy("", "none")
    torch.manual_seed(0)
    default = train_transform(64, AugmentPolicy.parse("ra"))(PHOTOS[0])
    torch.manual_seed(0)
    assert not torch.equal(default, train_transform(64, AugmentPolicy.parse("none"))(PHOTOS[0]))
    assert AugmentPolicy.parse("ra-m5-n3") == AugmentPolicy("ra-m5-n3", "torchvision", 3, 5)


@pytest.mark.parametrize("text, message", [("ra-m31", "magnitude bin m0..m30"), ("ra-n0", "n1..n14"),
                                           ("randaugment", "timm cannot parse"), ("autoaug", "expected 'ra'")])
def test_a_policy_that_does_not_exist_is_refused_naming_it(text, message):
    with pytest.raises(PolicyError, match=message) as e:
        AugmentPolicy.parse(text)
    assert f"--aa {text}" in str(e.value)


def test_dali_gets_torchvisions_bins_for_the_default_and_timms_mapped():
    assert dali_loader.rand_augment_args("ra") == (2, 9)  # bin 9 of 31, as torchvision
    assert dali_loader.rand_augment_args("ra-m5-n3") == (3, 5)
    assert dali_loader.rand_augment_args("rand-m9-mstd0.5") == (2, 27)  # timm's 9 of 10 = 27 of 30
    assert dali_loader.rand_augment_args("none") is None
