"""Images on their way from the loader's workers to the device: what a worker hands over, a batch of them packed
without padding, and the batch decoded on the device.

Workers do as little as they can. A JPEG the GPU can decode (3 colour components, a complete file) travels as its
encoded bytes, read but not decoded (its header gives the size), and the batch's JPEGs are decoded on the device at
once: nvJPEG through `torchvision.io.decode_jpeg(list, device="cuda")` (its hardware decoder on A100/H100-class GPUs),
or libjpeg-turbo with device="cpu". Everything else (PNG, CMYK and greyscale JPEGs, sources that hold pixels) is
decoded in the worker, a large JPEG at a reduced scale (`decode_rgb(..., min_side)`), and travels as HWC uint8
pixels: no HWC -> CHW copy on the host. A batch is two flat buffers, image after image, with each image's size: no
canvas, no padding to the largest image.

An image that nvJPEG cannot decode (corrupt inside, though its header and end marker looked right) is decoded alone
to find it, reported by its path and replaced by mid-grey of its size, so the batch and its view parameters keep
their shape; with strict, it raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from mochi_hub.core.distributed import to_device
from mochi_hub.data.augment import MOCO_V2
from mochi_hub.data.datasets import BadImageError, Raw, Sample, decode_rgb, open_image

JPEG_END = b"\xff\xd9"  # EOI: a file cut short lacks it, and is decoded (and reported) in the worker instead


def min_decoded_side(image_size: int) -> int:
    """The shorter side a JPEG may be reduced to when decoded: its smallest crop (area share MoCo-v2's scale[0]) is
    still >= image_size, so pre-shrinking never costs resolution a crop needs."""
    return math.ceil(image_size / math.sqrt(MOCO_V2.scale[0]))


@dataclass
class WorkerImage:
    """One image as a worker hands it over: the JPEG file to decode on the device, or decoded HWC pixels."""

    data: np.ndarray  # uint8 [n] encoded JPEG, or uint8 [h, w, 3] pixels
    size: tuple[int, int]  # (h, w) of the decoded image
    encoded: bool


def worker_image(raw: Raw, *, min_side: int | None, keep_jpeg: bool) -> WorkerImage:
    """A source's raw image -> what travels to the device. keep_jpeg: hand colour JPEGs over undecoded (the device
    decodes them); min_side: the shorter side a JPEG decoded here may be reduced to (`decode_rgb`)."""
    if keep_jpeg and isinstance(raw, bytes):
        header = open_image(raw)  # parses the header only
        if header.format == "JPEG" and header.mode == "RGB" and raw.endswith(JPEG_END):
            return WorkerImage(np.frombuffer(raw, np.uint8), (header.height, header.width), encoded=True)
    image = decode_rgb(raw, min_side)
    return WorkerImage(np.asarray(image), (image.height, image.width), encoded=False)  # [h, w, 3]


@dataclass
class PackedImages:
    """A batch of images of any sizes, back to back in two flat uint8 buffers (no padding): JPEG files to decode on
    the device, and pixels decoded in the workers. The DataLoader pins it (`pin_memory`) like a tensor."""

    encoded: Tensor  # uint8 [n]: the JPEG files, back to back
    pixels: Tensor  # uint8 [m]: the decoded images, HWC, back to back
    lengths: list[int]  # per image, its bytes in `encoded` or in `pixels`
    on_device: list[bool]  # per image, decoded on the device (in `encoded`)
    shapes: list[tuple[int, int]]  # per image, (h, w) as decoded
    names: list[str]  # per image, its path or id (to report an image the device cannot decode)

    @classmethod
    def of(cls, images: list[WorkerImage], names: list[str]) -> PackedImages:
        def flat(encoded: bool) -> Tensor:  # one copy, image after image
            parts = [i.data.reshape(-1) for i in images if i.encoded == encoded]
            return torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.uint8)

        return cls(
            encoded=flat(True),
            pixels=flat(False),
            lengths=[i.data.size for i in images],
            on_device=[i.encoded for i in images],
            shapes=[i.size for i in images],
            names=names,
        )

    @property
    def sizes(self) -> Tensor:
        """[B, 2] long (h, w), on the host: what the view parameters are drawn for."""
        return torch.tensor(self.shapes, dtype=torch.long).view(-1, 2)

    def pin_memory(self) -> PackedImages:
        return replace(self, pixels=self.pixels.pin_memory())  # the JPEG files stay where nvJPEG reads them

    def on(self, device: torch.device, *, strict: bool = False) -> tuple[list[Tensor], list[str]]:
        """-> (uint8 [3, h, w] per image on `device`, in batch order; reasons for the images replaced)."""
        jpegs = [n for n, gpu in zip(self.lengths, self.on_device) if gpu]
        decoded, skipped = self._decode(list(self.encoded.split(jpegs)), device, strict) if jpegs else ([], [])
        pixels = to_device(self.pixels, device).split([n for n, gpu in zip(self.lengths, self.on_device) if not gpu])
        jpeg_images, pixel_images = iter(decoded), iter(pixels)
        images = [
            next(jpeg_images) if gpu else next(pixel_images).view(h, w, 3).permute(2, 0, 1)
            for gpu, (h, w) in zip(self.on_device, self.shapes)
        ]  # [3, h, w] each
        return images, skipped

    def _decode(self, files: list[Tensor], device: torch.device, strict: bool) -> tuple[list[Tensor], list[str]]:
        try:
            return _decode_jpegs(files, device), []
        except RuntimeError:  # one bad file fails the whole batch: find it
            names = [name for name, gpu in zip(self.names, self.on_device) if gpu]
            shapes = [shape for shape, gpu in zip(self.shapes, self.on_device) if gpu]
            images, skipped = [], []
            for file, name, (h, w) in zip(files, names, shapes):
                try:
                    images += _decode_jpegs([file], device)
                except RuntimeError as error:
                    reason = f"{name}: the JPEG decoder on {device.type} failed: {str(error).splitlines()[0]}"
                    if strict:
                        raise BadImageError(f"unusable image (--strict-data): {reason}") from error
                    images.append(torch.full((3, h, w), 128, dtype=torch.uint8, device=device))
                    skipped.append(f"{reason} (replaced by grey)")
            return images, skipped


def _decode_jpegs(files: list[Tensor], device: torch.device) -> list[Tensor]:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's, still to come
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)


def collate_packed(samples: list[Sample]) -> dict:
    """Worker images -> one PackedImages, labels, and the skip reports (the device path's batches)."""
    return {
        "images": PackedImages.of([s.image for s in samples], [s.name for s in samples]),
        "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        "skipped": [reason for s in samples for reason in s.skipped],
    }
