"""Frame sampling and image transforms (README: Training) with PIL + numpy + torch only (no torchvision).

Train: RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip (p=0.5);
eval: Resize((image_size, image_size)); then ImageNet mean/std normalisation. Resizing uses PIL
bilinear with antialiasing, which is what torchvision does for PIL inputs.

One crop and one flip decision are drawn per clip and applied to all of its frames, so the n
frames stay spatially aligned (as video augmentations do). The OGM-GE reference code draws a new
crop per frame; for CREMA-D (1 frame) the two are the same. ``per_frame=True`` reproduces the
reference behaviour.

Speed: the resize is PIL's (the values torchvision would give); everything after it works on
uint8 until one conversion into a float32 destination (``out=``, e.g. a slot of a batch tensor
in shared memory), normalised in place with the same float32 operations as
``(x / 255 - mean) / std``, so results are bit-identical to the straightforward version.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def select_frames(n_available: int, n: int, train: bool, rng=None, pick: str = "segment") -> list[int]:
    """Indices of ``n`` frames out of ``n_available``, in time order.

    ``pick="segment"``: split [0, n_available) into n equal segments; train picks a uniform random
    point in each segment, eval its middle. With fewer frames than segments, segments share
    frames (3 out of 2 gives [0, 1, 1]). ``rng`` needs ``.random()`` (``random.Random`` or
    ``numpy.random.Generator``); eval ignores it and is deterministic.
    The reference code's rules, the same in train and eval (no rng): ``"first"``, the first n
    frames (OGM-GE's CREMA-D and VGGSound loaders take the first n files ``os.listdir`` lists;
    the last frame repeats when a clip has fewer); ``"fixed"``, frames ``seg * i`` with
    ``seg = n_available // n`` (its KS/AVE loader's ``frame_0000{seg*i+1}.jpg``, files numbered
    from 1 as FFmpeg numbers them).
    """
    if n_available < 1 or n < 1:
        raise ValueError(f"cannot select {n} frame(s) out of {n_available}")
    if pick == "first":
        return [min(i, n_available - 1) for i in range(n)]
    if pick == "fixed":
        return [(n_available // n) * i for i in range(n)]
    if pick != "segment":
        raise ValueError(f"unknown frame pick {pick!r}")
    width = n_available / n
    offsets = [rng.random() for _ in range(n)] if train else [0.5] * n
    return [min(n_available - 1, int(math.floor((i + u) * width))) for i, u in enumerate(offsets)]


def crop_params(width: int, height: int, rng, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), 10 tries then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * rng.random())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * rng.random())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.random() * (height - h + 1))
            left = int(rng.random() * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")   # convert() copies even when a no-op


def _chw_uint8(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """(3, H, W) uint8; the flip and the HWC -> CHW move share one uint8 copy."""
    a = np.asarray(_rgb(img))
    if flip:
        a = a[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """In place on (..., 3, H, W) float32: (x / 255 - mean) / std, in that order (exact parity)."""
    return x.div_(255.0).sub_(_MEAN).div_(_STD)


def to_tensor(img: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32, ImageNet-normalised (into ``out`` when given)."""
    chw = _chw_uint8(img)
    out = torch.empty(chw.shape) if out is None else out
    return _normalize_(out.copy_(chw))


def _resized(img: Image.Image, image_size: int, params: tuple[int, int, int, int] | None) -> Image.Image:
    img = _rgb(img)
    if params is not None:
        top, left, h, w = params
        # crop, then resize (what torchvision's resized_crop does; a resize box would blend in outside pixels)
        img = img.crop((left, top, left + w, top + h))
    return img.resize((image_size, image_size), Image.Resampling.BILINEAR)


def eval_transform(img: Image.Image, image_size: int = 224, out: torch.Tensor | None = None) -> torch.Tensor:
    return to_tensor(_resized(img, image_size, None), out)


def train_transform(img: Image.Image, image_size: int, params: tuple[int, int, int, int], flip: bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    chw = _chw_uint8(_resized(img, image_size, params), flip)
    out = torch.empty(chw.shape) if out is None else out
    return _normalize_(out.copy_(chw))


def transform_clip(images: list[Image.Image], *, train: bool, image_size: int = 224, rng=None,
                   per_frame: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """The frames of one clip -> float32 (n, 3, image_size, image_size), written into ``out``
    when given (a loader passes a slot of its batch tensor, so nothing is copied afterwards).
    A uint8 ``out`` gets the pixels unnormalised (``normalize_`` them later, e.g. on the GPU)."""
    out = torch.empty(len(images), 3, image_size, image_size) if out is None else out
    if out.shape != (len(images), 3, image_size, image_size):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(len(images), 3, image_size, image_size)}")
    params, flip = None, False
    for i, im in enumerate(images):
        if train and (params is None or per_frame):
            params, flip = crop_params(*im.size, rng), rng.random() < 0.5
        out[i].copy_(_chw_uint8(_resized(im, image_size, params), flip))
    return _normalize_(out) if out.dtype.is_floating_point else out     # once for the whole clip


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation in place of a float (..., 3, H, W) tensor holding 0..255 values
    (same float32 operations as the loader's, so results are bit-identical on CPU)."""
    return x.div_(255.0).sub_(_MEAN.to(x.device)).div_(_STD.to(x.device))
