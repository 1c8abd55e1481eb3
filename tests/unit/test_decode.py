"""What a loader worker hands over (JPEG bytes or decoded pixels), the JPEG pre-shrink that takes effect, batches
packed without padding, and an image the device decoder rejects found, reported and replaced."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from mochi_hub.data.datasets import BadImageError, ImageFolder, decode_rgb
from mochi_hub.data.decode import PackedImages, min_decoded_side, worker_image

CPU = torch.device("cpu")


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((500, 375))  # ImageNet's most common size


def test_a_jpeg_read_as_bytes_is_decoded_at_a_reduced_scale_that_still_covers_the_crops(photo, tmp_path):
    """The worker's decode with min_side: libjpeg's DCT scaling, from a file read by ImageFolder (the old path
    loaded the image before `draft`, so it never took effect)."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(encoded(photo, quality=90))
    raw, _ = ImageFolder(tmp_path).read(0)
    assert decode_rgb(raw).size == (500, 375)
    assert decode_rgb(raw, min_side=180).size == (250, 188)  # 1/2: the shorter side stays >= 180
    assert decode_rgb(raw, min_side=90).size == (125, 94)  # 1/4
    assert decode_rgb(raw, min_side=40).size == (63, 47)  # 1/8, libjpeg's smallest
    assert decode_rgb(raw, min_side=200).size == (500, 375)  # 1/2 would be 188 < 200: whole
    reference = np.asarray(photo.resize((250, 188), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(decode_rgb(raw, min_side=180), dtype=np.float64) - reference).mean() < 6  # same picture
    assert decode_rgb(encoded(photo, "PNG"), min_side=90).size == (500, 375)  # only JPEGs have DCT scaling
    assert min_decoded_side(224) == 501 and min_decoded_side(32) == 72  # 224 / sqrt(0.2), MoCo-v2's smallest crop


def test_the_worker_hands_colour_jpegs_over_undecoded_and_decodes_everything_else(photo):
    jpeg = encoded(photo, quality=90)
    item = worker_image(jpeg, min_side=None, keep_jpeg=True)
    assert item.encoded and item.size == (375, 500) and item.data.tobytes() == jpeg
    for raw in (
        encoded(photo.convert("L")),  # greyscale JPEG
        encoded(photo.convert("CMYK")),  # CMYK JPEG
        encoded(photo, "PNG"),
        photo,  # a source of pixels (Fashion-MNIST): no file
    ):
        item = worker_image(raw, min_side=None, keep_jpeg=True)
        assert not item.encoded and item.data.shape == (375, 500, 3) and item.data.dtype == np.uint8
    with pytest.raises(OSError, match="truncated"):  # cut short, no end marker: decoded here, so refused here
        worker_image(jpeg[: len(jpeg) // 2], min_side=None, keep_jpeg=True)  # (DecodedImages reports it)
    assert not worker_image(jpeg, min_side=180, keep_jpeg=False).encoded  # pixels path: decoded, at 1/2
    assert worker_image(jpeg, min_side=180, keep_jpeg=False).size == (188, 250)


def test_a_packed_batch_has_no_padding_and_unpacks_to_each_image(photo):
    small = photo.resize((60, 80))  # portrait 80 x 60
    items = [
        worker_image(encoded(photo), min_side=None, keep_jpeg=True),
        worker_image(encoded(small, "PNG"), min_side=None, keep_jpeg=True),
        worker_image(encoded(small), min_side=None, keep_jpeg=True),
    ]
    packed = PackedImages.of(items, ["a.jpg", "b.png", "c.jpg"])
    assert packed.on_device == [True, False, True]
    assert packed.pixels.numel() == 80 * 60 * 3 and packed.encoded.numel() == items[0].data.size + items[2].data.size
    assert packed.sizes.tolist() == [[375, 500], [80, 60], [80, 60]]
    images, replaced = packed.on(CPU)
    assert replaced == [] and [tuple(i.shape) for i in images] == [(3, 375, 500), (3, 80, 60), (3, 80, 60)]
    assert torch.equal(images[1], torch.from_numpy(np.array(small)).permute(2, 0, 1))  # PNG: exact
    assert torch.equal(images[0], torch.from_numpy(np.array(decode_rgb(encoded(photo)))).permute(2, 0, 1))


def test_a_jpeg_the_device_decoder_rejects_is_reported_and_replaced_by_grey(photo):
    """Its header and end marker look right (so the worker hands it over), its Huffman table is bogus: the batch
    decode fails, each image is decoded alone, the bad one is named and replaced by grey of its size."""
    good = encoded(photo)
    bad = bytearray(encoded(photo.resize((50, 40))))
    table = bad.index(b"\xff\xc4") + 5  # DHT marker, length (2), class/id (1): then 16 code counts
    bad[table : table + 16] = b"\xff" * 16  # more codes than a table may hold
    items = [worker_image(raw, min_side=None, keep_jpeg=True) for raw in (good, bytes(bad), good)]
    assert all(item.encoded for item in items)
    packed = PackedImages.of(items, ["good.jpg", "bad.jpg", "good2.jpg"])
    images, replaced = packed.on(CPU)
    assert len(replaced) == 1 and replaced[0].startswith("bad.jpg: the JPEG decoder on cpu failed")
    assert images[1].shape == (3, 40, 50) and images[1].eq(128).all()
    assert torch.equal(images[0], images[2]) and images[0].shape == (3, 375, 500)
    with pytest.raises(BadImageError, match="bad.jpg"):
        packed.on(CPU, strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_decodes_a_batch_as_the_cpu_decoder_does(photo):
    """nvJPEG against libjpeg-turbo on the same files (their IDCT and chroma upsampling may differ by a few levels;
    the bounds are loose because this has not yet run on a GPU here)."""
    files = [encoded(photo, quality=q) for q in (75, 90, 95)] + [encoded(photo.resize((61, 47)))]
    packed = PackedImages.of([worker_image(f, min_side=None, keep_jpeg=True) for f in files], ["x.jpg"] * 4)
    cuda, replaced = packed.on(torch.device("cuda"))
    cpu, _ = packed.on(CPU)
    assert replaced == [] and all(image.is_cuda for image in cuda)
    for gpu_image, cpu_image in zip(cuda, cpu):
        difference = (gpu_image.cpu().float() - cpu_image.float()).abs()
        assert gpu_image.shape == cpu_image.shape and difference.mean() < 2 and difference.max() < 48
