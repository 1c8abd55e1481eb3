"""MoCo-v2's augmentation, batched on the training device, with independent random parameters per image.

The images arrive on the device as a list of uint8 [3, h, w] tensors of any sizes (mochi_hub.data.decode: decoded
there by nvJPEG, or in the workers), and `DeviceViews` draws the two views of the batch there (CUDA or CPU), as
`mochi_hub.data.augment.moco_v2_transform` does per image with PIL: RandomResizedCrop(scale=(0.2, 1)) ->
ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 -> grayscale p=0.2 -> Gaussian blur sigma ~ U(0.1, 2) with p=0.5 ->
horizontal flip -> normalise. Each image is cropped in its own pixels (no canvas, no padding); from the S x S crops
on, the batch is one tensor.

Why not torchvision.transforms.v2: on a batch it draws one parameter set for the whole batch, so every image
would share its crop, jitter and flip. Why not kornia: it is not installed on the target GPU machine. So this is
torch + torchvision.ops only, with the randomness kept apart from the math: `sample_view_params` draws every
parameter from a torch.Generator, `apply_view` is deterministic given them (so each op can be checked against
torchvision's functional op with fixed parameters).

Differences from the worker path, all small: the worker's PIL ops round to uint8 after every op, here the colour
math runs in float on [0, 1] as torchvision's tensor ops do (and jitter uses the tensor ops' formulas, e.g. the
contrast mean is the float mean of the grayscale image); the resize and the blur are described at `apply_view`
and `_blur`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from mochi_hub.core.distributed import to_device
from mochi_hub.data.augment import MEAN, MOCO_V2, STD, MoCoV2Augment

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
BLUR_TRUNCATE = 3.0  # Gaussian kernel half-width = ceil(3 sigma): see `_blur`
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op ids, as torchvision's ColorJitter numbers them


@dataclass(frozen=True)
class ViewParams:
    """The random part of one view of a batch of B images; everything `apply_view` needs besides the pixels."""

    crop: Tensor  # [B, 4] long: top, left, height, width in the image's own pixels (as RandomResizedCrop)
    jitter: Tensor  # [B] bool: colour jitter applied
    factors: Tensor  # [B, 4] float: brightness, contrast, saturation (neutral 1), hue (neutral 0)
    order: Tensor  # [B, 4] long: order[b, k] = the op id applied k-th to image b (a permutation of 0..3)
    gray: Tensor  # [B] bool
    blur: Tensor  # [B] bool
    sigma: Tensor  # [B] float: blur sigma (only used where blur)
    flip: Tensor  # [B] bool
    # Plain int, not a tensor: the blur kernel's common size is then known without reading the device.
    blur_half_max: int = math.ceil(BLUR_TRUNCATE * MOCO_V2.blur_sigma[1])

    def to(self, device: torch.device | str) -> ViewParams:
        tensors = (self.crop, self.jitter, self.factors, self.order, self.gray, self.blur, self.sigma, self.flip)
        return ViewParams(*(to_device(t, device) for t in tensors), blur_half_max=self.blur_half_max)


def sample_view_params(
    sizes: Tensor,
    *,
    generator: torch.Generator,
    augment: MoCoV2Augment = MOCO_V2,
) -> ViewParams:
    """Draw one view's parameters for images of sizes [B, 2] (h, w), all from `generator`, on the CPU.

    A few numbers per image: drawn on the host they cost nothing, are the same whatever device renders the views
    (CUDA's Philox output depends on launch geometry), and reach the device in one non-blocking copy.

    The crop is torchvision's RandomResizedCrop.get_params, vectorised: all 10 attempts (area share ~ U(scale),
    log aspect ratio ~ U(log ratio)) are drawn for every image at once and the first that fits is kept, else the
    central crop clamped to the ratio range. Jitter factors and op order follow ColorJitter.get_params: factors
    ~ U[max(0, 1 - x), 1 + x] (hue U[-h, h]), a jitter strength of 0 meaning that op is left out, and a uniform
    random permutation of the four ops per image.
    """
    if generator.device.type != "cpu":
        raise ValueError(f"view parameters are drawn on the CPU; got a generator on {generator.device}")
    sizes = sizes.cpu()
    count = sizes.shape[0]
    scale, ratio, jitter, blur_sigma = augment.scale, augment.ratio, augment.jitter, augment.blur_sigma

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0, dtype=torch.float32) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low

    # RandomResizedCrop: float32 draws as torchvision's, the box arithmetic in float64 as its Python floats.
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # [B, 1]
    log_ratio = _float32_log(ratio)
    target_area = height * width * uniform(count, 10, low=scale[0], high=scale[1]).double()  # [B, 10]
    aspect = torch.exp(uniform(count, 10, low=log_ratio[0], high=log_ratio[1])).double()  # [B, 10]
    w = torch.round(torch.sqrt(target_area * aspect))  # [B, 10]; round half to even, as Python's round
    h = torch.round(torch.sqrt(target_area / aspect))  # [B, 10]
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [B, 10]
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # [B, 1]: first fitting attempt (0 if none fits)
    found = fits.any(1)  # [B]
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]  # [B]
    height, width = height[:, 0], width[:, 0]  # [B]
    # torch.randint(0, n) per image: floor(U[0, 1) * n), with U in float64 so it stays below n.
    top = torch.floor(uniform(count, dtype=torch.float64) * (height - h + 1))  # [B]
    left = torch.floor(uniform(count, dtype=torch.float64) * (width - w + 1))  # [B]
    # Fallback: the whole image, its width or height cut to the nearest allowed ratio; centred.
    in_ratio = width / height  # [B]
    fall_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)  # [B]
    fall_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)  # [B]
    fall_top, fall_left = (
        torch.div(height - fall_h, 2, rounding_mode="floor"),
        torch.div(width - fall_w, 2, rounding_mode="floor"),
    )
    crop = torch.stack(
        [
            torch.where(found, top, fall_top),
            torch.where(found, left, fall_left),
            torch.where(found, h, fall_h),
            torch.where(found, w, fall_w),
        ],
        1,
    ).long()  # [B, 4]

    # ColorJitter: an op with strength 0 gets its neutral factor (torchvision skips it; see _jitter for hue).
    low = torch.tensor([max(0.0, 1 - x) for x in jitter[:3]] + [-jitter[3]])  # [4]
    high = torch.tensor([1 + x for x in jitter[:3]] + [jitter[3]])  # [4]
    factors = uniform(count, 4) * (high - low) + low  # [B, 4]
    order = uniform(count, 4).argsort(1)  # [B, 4]: argsort of iid uniforms is a uniform permutation

    def coin(p: float) -> Tensor:
        return uniform(count) < p  # [B] bool

    return ViewParams(
        crop=crop,
        jitter=coin(augment.jitter_p),
        factors=factors,
        order=order,
        gray=coin(augment.gray_p),
        blur=coin(augment.blur_p),
        sigma=uniform(count, low=blur_sigma[0], high=blur_sigma[1]),
        flip=coin(augment.flip_p),
        blur_half_max=math.ceil(BLUR_TRUNCATE * blur_sigma[1]),
    )


def apply_view(
    images: Sequence[Tensor],
    params: ViewParams,
    *,
    output_size: int,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
    antialias: bool = True,
) -> Tensor:
    """uint8 [3, h, w] images of any sizes (a list, or a [B, 3, H, W] batch) -> one view, normalised float32
    [B, 3, S, S].

    Crop + resize is `torchvision.ops.roi_align` on each image, with aligned=True (pixel centres at +0.5, the
    convention of F.interpolate(align_corners=False)); roi_align repeats an image's edge pixels beyond it, as
    resized_crop clamps:
    - antialias=False (sampling_ratio=1: one bilinear sample at each output pixel's centre) equals torchvision's
      `resized_crop(..., BILINEAR, antialias=False)` up to float rounding when shrinking; when enlarging, the
      outermost output rows/columns (those whose centre maps outside the crop's outer pixel centres) blend in the
      pixel just outside the crop, where resized_crop repeats the crop's edge pixel.
    - antialias=True (the default; sampling_ratio=0: ceil(crop / S) samples per output pixel and axis, averaged)
      is a box-prefiltered bilinear shrink, close to resized_crop(antialias=True) and PIL's resize in the worker
      path but not equal to them (their filter is a triangle whose support scales with the shrink).
    Then colour jitter (per image, in its own op order), grayscale, Gaussian blur, flip, normalisation.
    """
    params = params.to(images[0].device)
    crops = _resized_crops(images, params.crop[:, None], output_size, antialias)[0]  # [B, 3, S, S]
    return _colour_and_flip(crops, params, mean=mean, std=std)


class DeviceViews:
    """MoCo-v2's two views (query, key) of a batch, drawn on the batch's device with independent parameters
    per image and per view. Defaults are MoCo-v2's (those of `mochi_hub.data.augment.moco_v2_transform`)."""

    def __init__(
        self,
        image_size: int,
        *,
        mean: tuple[float, ...] = MEAN,
        std: tuple[float, ...] = STD,
        augment: MoCoV2Augment = MOCO_V2,
        antialias: bool = True,
    ):
        self.image_size, self.mean, self.std, self.antialias = image_size, mean, std, antialias
        self.augment = augment

    def sample(self, sizes: Tensor, generator: torch.Generator) -> ViewParams:
        return sample_view_params(sizes, generator=generator, augment=self.augment)

    def __call__(self, images: Sequence[Tensor], sizes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """uint8 [3, h, w] images on the device, their sizes [B, 2] on the host, a CPU generator -> (query, key),
        each float32 [B, 3, S, S]. Nothing waits for the device: parameters are drawn on the host and copied
        without blocking; both views of an image come from one crop call."""
        device = images[0].device
        query, key = (self.sample(sizes, generator).to(device) for _ in range(2))
        crops = _resized_crops(
            images, torch.stack([query.crop, key.crop], 1), self.image_size, self.antialias
        )  # [2, B, 3, S, S]
        return tuple(
            _colour_and_flip(crops[v], params, mean=self.mean, std=self.std) for v, params in enumerate((query, key))
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.augment}, antialias={self.antialias})"


def _resized_crops(images: Sequence[Tensor], crops: Tensor, output_size: int, antialias: bool) -> Tensor:
    """uint8 [3, h_b, w_b] images, crops [B, V, 4] long (top, left, height, width) on their device -> float32
    [V, B, 3, S, S] in [0, 1]: V crops of each image, each resized to S x S. One roi_align per image (its own size:
    nothing padded); its V boxes index image 0 of a one-image batch."""
    top, left, h, w = crops.to(torch.float32).unbind(-1)  # [B, V] each
    boxes = torch.stack([torch.zeros_like(top), left, top, left + w, top + h], -1)  # [B, V, 5]: index, x1, y1, x2, y2
    ratio = 0 if antialias else 1
    return (
        torch.stack(
            [
                roi_align(
                    image[None].to(torch.float32, memory_format=torch.contiguous_format),  # [1, 3, h, w]
                    box,
                    output_size,
                    spatial_scale=1.0,
                    sampling_ratio=ratio,
                    aligned=True,
                )
                for image, box in zip(images, boxes)
            ],
            1,
        )
        / 255
    )  # [V, B, 3, S, S]


def _colour_and_flip(x: Tensor, params: ViewParams, *, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """The crops' colour jitter, grayscale, blur, flip and normalisation, with params on their device."""
    x = _jitter(x, params.jitter, params.factors, params.order)
    x = torch.where(params.gray[:, None, None, None], _grayscale(x).expand_as(x), x)
    x = torch.where(params.blur[:, None, None, None], _blur(x, params.sigma, params.blur_half_max), x)
    x = torch.where(params.flip[:, None, None, None], x.flip(-1), x)
    mean_t, std_t = _channel_constants(mean, std, x.device)  # [1, 3, 1, 1] each
    return (x - mean_t) / std_t  # [B, 3, S, S]


@functools.cache
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Normalisation constants, made once per device (a per-step torch.tensor(..., device=cuda) is a blocking copy)."""
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)


@functools.cache
def _float32_log(ratio: tuple[float, float]) -> tuple[float, float]:
    """log of the aspect-ratio bounds rounded to float32, as torchvision's torch.log(torch.tensor(ratio))."""
    low, high = torch.tensor(ratio).log().tolist()
    return low, high


def _grayscale(x: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: torchvision's rgb_to_grayscale."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend with a per-image factor [B]: factor x + (1 - factor) other, clamped to [0, 1]."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _grayscale(x).mean((1, 2, 3), keepdim=True), factor)  # blend towards the mean gray level


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _grayscale(x), factor)


def _hue(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's adjust_hue with a per-image factor [B]: rotate the HSV hue by factor turns, S and V kept.

    Same formulas as torchvision's RGB -> HSV -> RGB, fused: with chroma = max - min = V S, channel n of the
    result is V - chroma clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6 for n = 5, 3, 1 (R, G, B), which is the
    six-sector table in closed form (S is never formed). Per-channel planes: ~1.7x faster on the CPU than [B, 3]
    tensors.
    """
    r, g, b = x.unbind(1)  # [B, H, W] each
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    divisor = torch.where(chroma == 0, 1.0, chroma)  # gray pixels: any hue, chroma 0 cancels it (no NaN)
    hue6 = torch.where(
        maxc == r, (g - b) / divisor, torch.where(maxc == g, 2.0 + (b - r) / divisor, 4.0 + (r - g) / divisor)
    )  # 6 H (mod 6)
    hue6 = hue6 + 6 * factor.view(-1, 1, 1)  # [B, H, W]

    def channel(n: float) -> Tensor:
        k = (hue6 + n) % 6
        return maxc - chroma * torch.minimum(k, 4 - k).clamp(0, 1)  # [B, H, W]

    return torch.stack([channel(5.0), channel(3.0), channel(1.0)], 1)  # [B, 3, H, W]


def _jitter(x: Tensor, apply: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter per image: for each of the 4 slots, image b gets op order[b, slot] with its own factor.

    Brightness, contrast and saturation are all blends, so one blend per slot serves every image (towards 0, the
    mean gray or the gray image, per image); hue is computed for the batch and kept where chosen. Images without
    jitter keep their pixels exactly, as do neutral factors (1, 1, 1, 0): a hue strength of 0, which torchvision
    skips, gives hue factors of exactly 0, which skip the HSV round trip here.
    """
    for slot in range(4):
        op = order[:, slot]  # [B]
        gray = _grayscale(x)  # [B, 1, H, W]
        other = torch.where(
            (op == CONTRAST).view(-1, 1, 1, 1),
            gray.mean((1, 2, 3), keepdim=True),
            torch.where((op == SATURATION).view(-1, 1, 1, 1), gray, torch.zeros_like(gray)),
        )
        blend_factor = factors.gather(1, op.clamp(max=SATURATION)[:, None])[:, 0]  # [B]
        blended = _blend(x, other, blend_factor)  # [B, 3, H, W]
        use_blend = (apply & (op != HUE)).view(-1, 1, 1, 1)
        use_hue = (apply & (op == HUE) & (factors[:, HUE] != 0)).view(-1, 1, 1, 1)
        x = torch.where(use_blend, blended, torch.where(use_hue, _hue(x, factors[:, HUE]), x))
    return x


def _blur(x: Tensor, sigma: Tensor, half_max: int) -> Tensor:
    """Gaussian blur [B, C, H, W] with a per-image sigma [B]: separable, reflect padding (as torchvision).

    Kernel size rule: 2 ceil(3 sigma) + 1 taps, i.e. torchvision's `gaussian_blur(kernel_size, sigma)` with that
    kernel size. MoCo's reference uses PIL's GaussianBlur(radius=sigma), where radius is the standard deviation:
    PIL runs three extended box blurs of total variance sigma^2, whose support is 3 (floor((sqrt(4 sigma^2 + 1)
    - 1) / 2) + 1) pixels per side (3 below sigma = sqrt 2, 6 from there to sqrt 6): the same support as this rule
    at sigma = 1 and 2, with a piecewise-quadratic rather than Gaussian profile; on a photo the two differ by at most
    3/255 (mean under 0.7/255, PIL's uint8 rounding included). All images share one kernel of 2 half_max + 1
    taps, each zeroed beyond its own half-width and renormalised (zero taps read nothing, so this equals the
    per-image kernel); half_max is capped at H - 1 and W - 1, which reflect padding requires.
    """
    count, channels, height, width = x.shape
    half_max = min(half_max, height - 1, width - 1)
    offsets = torch.arange(-half_max, half_max + 1, device=x.device, dtype=x.dtype)  # [K]
    half = torch.ceil(BLUR_TRUNCATE * sigma).clamp(max=half_max)  # [B]
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2) * (offsets.abs() <= half[:, None])  # [B, K]
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # [B C, K]
    y = x.reshape(1, count * channels, height, width)  # one group per image channel: its own kernel
    y = F.conv2d(
        F.pad(y, (half_max, half_max, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=count * channels
    )  # horizontal pass
    y = F.conv2d(
        F.pad(y, (0, 0, half_max, half_max), mode="reflect"), kernel[:, None, :, None], groups=count * channels
    )  # vertical pass
    return y.view(count, channels, height, width)
