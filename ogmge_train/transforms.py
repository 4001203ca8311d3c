"""Frame sampling and image transforms (SPEC §5) with PIL + numpy + torch only (no torchvision).

Train: RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip (p=0.5);
eval: Resize((image_size, image_size)); then ImageNet mean/std normalisation. Resizing uses PIL
bilinear with antialiasing, which is what torchvision does for PIL inputs.

One crop and one flip decision are drawn per clip and applied to all of its frames, so the n
frames stay spatially aligned (as video augmentations do). The OGM-GE reference code draws a new
crop per frame; for CREMA-D (1 frame) the two are the same. ``per_frame=True`` reproduces the
reference behaviour.
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


def select_frames(n_available: int, n: int, train: bool, rng=None) -> list[int]:
    """Indices of ``n`` frames out of ``n_available``: split [0, n_available) into n equal
    segments; train picks a uniform random point in each segment, eval its middle.

    With fewer frames than segments, segments share frames (3 out of 2 gives [0, 1, 1]), so
    the output always has n indices in time order. ``rng`` needs ``.random()``
    (``random.Random`` or ``numpy.random.Generator``); eval ignores it and is deterministic.
    """
    if n_available < 1 or n < 1:
        raise ValueError(f"cannot select {n} frame(s) out of {n_available}")
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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32, ImageNet-normalised."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - _MEAN) / _STD


def eval_transform(img: Image.Image, image_size: int = 224) -> torch.Tensor:
    return to_tensor(img.convert("RGB").resize((image_size, image_size), Image.BILINEAR))


def train_transform(img: Image.Image, image_size: int, params: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    top, left, h, w = params
    # crop, then resize (what torchvision's resized_crop does; a resize box would blend in outside pixels)
    img = img.convert("RGB").crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.BILINEAR)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def transform_clip(images: list[Image.Image], *, train: bool, image_size: int = 224, rng=None,
                   per_frame: bool = False) -> torch.Tensor:
    """The frames of one clip -> float32 (n, 3, image_size, image_size)."""
    if not train:
        return torch.stack([eval_transform(im, image_size) for im in images])
    out, params, flip = [], None, False
    for im in images:
        if params is None or per_frame:
            params, flip = crop_params(*im.size, rng), rng.random() < 0.5
        out.append(train_transform(im, image_size, params, flip))
    return torch.stack(out)
