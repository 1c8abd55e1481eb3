"""Image transforms: MoCo-v2's augmentation for pretraining, and the probe's train/eval transforms; the settings of
both view paths (these PIL transforms and mochi_hub.data.device_augment) and ImageNet's statistics live here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

# ImageNet statistics, as in MoCo; also written into the exported pretrained_cfg.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MoCoV2Augment:
    """MoCo-v2's augmentation (Chen et al. 2020; main_moco.py --aug-plus), the same for views drawn per image with
    PIL (`moco_v2_transform`) and batched on the device (mochi_hub.data.device_augment)."""

    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop: area share of the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop: aspect ratio of the crop
    jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.4,
        0.1,
    )  # ColorJitter: brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur, sigma ~ U(low, high)
    blur_p: float = 0.5
    flip_p: float = 0.5

    def describe(self) -> str:
        """One line for the model card."""
        return (
            f"MoCo-v2 (random resized crop {self.scale[0]:g}-{self.scale[1]:g}, colour jitter "
            f"{', '.join(f'{x:g}' for x in self.jitter)} with p {self.jitter_p:g}, grayscale p {self.gray_p:g}, "
            f"blur sigma {self.blur_sigma[0]:g}-{self.blur_sigma[1]:g} with p {self.blur_p:g}, flip p {self.flip_p:g})"
        )


MOCO_V2 = MoCoV2Augment()


class GaussianBlur:
    """MoCo-v2's blur, as in its reference code: PIL's GaussianBlur with radius sigma ~ U(0.1, 2.0).

    sigma is drawn from torch's RNG, so seeded augmentation stays reproducible; PIL's filter is ~3.5x
    faster than torchvision's GaussianBlur on a PIL image on the CPU.
    """

    def __init__(self, sigma: tuple[float, float] = MOCO_V2.blur_sigma):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def moco_v2_transform(image_size: int, augment: MoCoV2Augment = MOCO_V2) -> T.Compose:
    """MoCo-v2: RandomResizedCrop (0.2, 1), colour jitter p=0.8, grayscale p=0.2, blur p=0.5, flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=augment.scale, ratio=augment.ratio),
            T.RandomApply([T.ColorJitter(*augment.jitter)], p=augment.jitter_p),
            T.RandomGrayscale(p=augment.gray_p),
            T.RandomApply([GaussianBlur(augment.blur_sigma)], p=augment.blur_p),
            T.RandomHorizontalFlip(p=augment.flip_p),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class TwoViews:
    """Two independent augmentations of one image: the query view and the key view."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def probe_train_transform(image_size: int, min_scale: float = 0.08) -> T.Compose:
    """The linear protocol's training augmentation: RandomResizedCrop (area share min_scale..1) + flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(min_scale, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def eval_transform(image_size: int, crop_pct: float = 224 / 256) -> T.Compose:
    """Resize to image_size / crop_pct, then centre crop (256 -> 224 at ImageNet scale)."""
    return T.Compose(
        [T.Resize(round(image_size / crop_pct)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
