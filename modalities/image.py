"""Images: JPEG, PNG, WebP, BMP, TIFF and GIF (first frame) to ``(3, S, S)`` ImageNet-normalised maps.

Raw form: an 8-bit RGB :class:`PIL.Image.Image`. Grey, grey+alpha, palette and RGBA images become RGB (alpha is
dropped, as the official ImageNet pipeline does); 16-bit and 32-bit integer images are rescaled to 8 bits from the
full range of their type, 32-bit float image files from their own minimum and maximum; float arrays and tensors
must hold values in [0, 1].

Eval transform (the official recipe): resize the short side to ``S / crop_pct`` and centre-crop ``S`` (``crop_pct``
0.875 below 384 px); at 384 px and above, resize straight to ``S x S``. Train transform: timm's factory (random
resized crop, horizontal flip, RandAugment, random erasing).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from .base import ModalityAdapter, register_modality
from .errors import InvalidInputError
from .sources import describe_source, open_file_source

__all__ = ["ImageAdapter", "IMAGENET_MEAN", "IMAGENET_STD", "array_to_image"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` in any numeric dtype to uint8, rescaling integer types by their range."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.min < 0:
            raise InvalidInputError(f"{name}: signed integer images are not supported (got {array.dtype})")
        return (array.astype(np.float64) * (255.0 / info.max)).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{name}: the image holds NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise InvalidInputError(
                f"{name}: float images must hold values in [0, 1], got [{array.min():.3g}, {array.max():.3g}]"
            )
        return (array * 255.0).round().astype(np.uint8)
    raise InvalidInputError(f"{name}: unsupported image dtype {array.dtype}")


def array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """An ``(H, W)`` or ``(H, W, C)`` array with C in 1..4 to an RGB image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise InvalidInputError(
            f"{name}: expected an image array (H, W) or (H, W, C) with C in 1..4, got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name}: the image is empty (shape {array.shape})")
    array = _array_to_uint8(np.ascontiguousarray(array), name)
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.shape[-1] == 2:  # grey + alpha
        return Image.fromarray(array[..., 0], mode="L").convert("RGB")
    return Image.fromarray(array[..., :3], mode="RGB")


def _pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        if image.mode == "I":  # 32-bit signed container, usually holding 16-bit data
            top = 65535 if array.max() <= 65535 else int(array.max())
            array = (np.clip(array, 0, None).astype(np.float64) / top).astype(np.float32)
        elif image.mode == "F":  # 32-bit float images (TIFF): rescaled from their own range
            array = array.astype(np.float64)
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{name}: the image holds NaN or infinite values")
            low, high = array.min(), array.max()
            array = ((array - low) / (high - low) if high > low else np.zeros_like(array)).astype(np.float32)
        return array_to_image(array.astype(np.uint16) if image.mode.startswith("I;16") else array, name)
    return image.convert("RGB")


@register_modality("image")
class ImageAdapter(ModalityAdapter):
    """Images to ``(3, image_size, image_size)`` ImageNet-normalised maps.

    Args:
        image_size: output side ``S`` in pixels.
        crop_pct: eval centre-crop fraction; ``None`` for the official 0.875 below 384 px and a straight resize at
            384 px and above.
        interpolation: ``"bicubic"`` (official), ``"bilinear"`` or ``"nearest"``.
        mean, std: normalisation statistics (ImageNet by default).
        auto_augment: timm RandAugment policy for training; ``None`` disables it.
        re_prob: random-erasing probability for training.
        hflip: horizontal-flip probability for training.
        scale: random-resized-crop area range for training.
    """

    def __init__(
        self,
        image_size: int = 224,
        crop_pct: Optional[float] = None,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
    ):
        if image_size < 32:
            raise InvalidInputError(f"image_size must be at least 32 pixels, got {image_size}")
        if interpolation not in _INTERPOLATION:
            raise InvalidInputError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise InvalidInputError(f"crop_pct must be in (0, 1], got {crop_pct}")
        super().__init__(
            image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, mean=list(mean), std=list(std),
            auto_augment=auto_augment, re_prob=re_prob, hflip=hflip, scale=list(scale),
        )
        mode = _INTERPOLATION[interpolation]
        if crop_pct is None and image_size >= 384:
            resize = [T.Resize((image_size, image_size), interpolation=mode, antialias=True)]
        else:
            fraction = 0.875 if crop_pct is None else crop_pct
            resize = [T.Resize(int(image_size / fraction), interpolation=mode, antialias=True),
                      T.CenterCrop(image_size)]
        self.eval_transform = T.Compose(
            [T.PILToTensor(), *resize, T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
        )
        from timm.data import create_transform

        self.train_transform = create_transform(
            image_size, is_training=True, scale=tuple(scale), hflip=hflip, auto_augment=auto_augment,
            interpolation=interpolation, mean=tuple(mean), std=tuple(std), re_prob=re_prob,
        )

    @property
    def out_channels(self) -> int:
        return 3

    def load(self, source: Any) -> Image.Image:
        """A path, bytes, a binary file object, an ``(H, W[, C])`` array or a ``(C, H, W)`` tensor -> RGB image."""
        name = describe_source(source)
        if isinstance(source, Image.Image):
            try:
                return _pil_to_rgb(source, name)
            except (OSError, ValueError) as exc:
                if isinstance(exc, InvalidInputError):
                    raise
                raise InvalidInputError(f"{name}: cannot convert a {source.mode} image to RGB ({exc})") from exc
        if isinstance(source, torch.Tensor):
            if source.ndim == 2:
                source = source.unsqueeze(0)
            if source.ndim != 3 or source.shape[0] not in (1, 2, 3, 4):
                raise InvalidInputError(
                    f"{name}: expected an image tensor (C, H, W) with C in 1..4, got shape {tuple(source.shape)}"
                )
            pixels = source.detach().cpu().permute(1, 2, 0)
            if pixels.is_floating_point() and pixels.dtype != torch.float64:
                pixels = pixels.float()  # numpy has no bfloat16
            return array_to_image(pixels.numpy(), name)
        if isinstance(source, np.ndarray):
            return array_to_image(source, name)
        opener = open_file_source(source, "image", "a numpy array or a tensor")
        try:
            with Image.open(opener) as image:
                image.seek(0)  # animated GIF/WebP: the first frame
                image.load()
                return _pil_to_rgb(image, name)
        except InvalidInputError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: not a readable image ({type(exc).__name__}: {exc}); expected JPEG, PNG, WebP, BMP, TIFF "
                f"or GIF"
            ) from exc

    def example(self, seed: int = 0) -> np.ndarray:
        """A random RGB image ``(H, W, 3)`` uint8, a little larger than ``image_size`` (resize and crop still run)."""
        side = round(self.config["image_size"] * 8 / 7)
        return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        """RGB image -> ``(3, S, S)`` float32, normalised (eval transform)."""
        return self.eval_transform(raw)

    def prepare(self, source: Any, train: bool = False) -> torch.Tensor:
        """Eval transform, or for training timm's train transform on the raw image: ``(3, S, S)``."""
        raw = self.load(source)
        return self.train_transform(raw) if train else self.preprocess(raw)
