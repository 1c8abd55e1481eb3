"""Image transforms: MoCo-v2's augmentation for pretraining, and the probe's train/eval transforms."""

from __future__ import annotations

from torchvision import transforms as T

# ImageNet statistics, as in MoCo; also written into the exported pretrained_cfg.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _blur_kernel(image_size: int) -> int:
    """About 10% of the image side, odd, as in SimCLR / MoCo-v2 (23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def moco_v2_transform(image_size: int) -> T.Compose:
    """MoCo-v2: RandomResizedCrop (0.2, 1), colour jitter p=0.8, grayscale p=0.2, blur p=0.5, flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(_blur_kernel(image_size), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


class TwoViews:
    """Two independent augmentations of one image: the query view and the key view."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def probe_train_transform(image_size: int) -> T.Compose:
    """The linear protocol's training augmentation: RandomResizedCrop + flip."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform(image_size: int) -> T.Compose:
    """Resize to 256/224 of the crop, then centre crop (256 -> 224 at ImageNet scale)."""
    return T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])
