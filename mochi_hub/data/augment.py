"""Image transforms: MoCo-v2's augmentation for pretraining, and the probe's train/eval transforms."""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

# ImageNet statistics, as in MoCo; also written into the exported pretrained_cfg.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """MoCo-v2's blur, as in its reference code: PIL's GaussianBlur with radius sigma ~ U(0.1, 2.0).

    sigma is drawn from torch's RNG, so seeded augmentation stays reproducible; PIL's filter is ~3.5x
    faster than torchvision's GaussianBlur on a PIL image on the CPU.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def moco_v2_transform(image_size: int) -> T.Compose:
    """MoCo-v2: RandomResizedCrop (0.2, 1), colour jitter p=0.8, grayscale p=0.2, blur p=0.5, flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
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


def eval_transform(image_size: int) -> T.Compose:
    """Resize to 256/224 of the crop, then centre crop (256 -> 224 at ImageNet scale)."""
    return T.Compose(
        [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
