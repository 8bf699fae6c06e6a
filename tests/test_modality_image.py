"""The adapter registry and the image adapter, on real files written by Pillow."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from modalities import ImageAdapter, InvalidInputError, ModalityAdapter, ModalityError, create_adapter
from modalities import list_modalities, register_modality
from modalities.image import IMAGENET_MEAN, IMAGENET_STD


def gradient_image(width=64, height=48):
    """An RGB image whose red channel rises left to right and green channel top to bottom."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)


def test_registry_lists_and_rebuilds_adapters():
    assert "image" in list_modalities()
    adapter = create_adapter("image", image_size=96, crop_pct=0.9)
    config = json.loads(json.dumps(adapter.config))
    rebuilt = create_adapter("image", **config)
    assert rebuilt.config == adapter.config and isinstance(rebuilt, ImageAdapter)
    with pytest.raises(ModalityError, match="unknown modality 'smell'; registered modalities: .*image"):
        create_adapter("smell")


def test_registering_a_new_modality():
    @register_modality("constant_test")
    class Constant(ModalityAdapter):
        def __init__(self, size=32):
            super().__init__(size=size)
            self.size = size

        @property
        def out_channels(self):
            return 1

        def load(self, source):
            return float(source)

        def preprocess(self, raw):
            return torch.full((1, self.size, self.size), raw)

    adapter = create_adapter("constant_test", size=40)
    assert adapter.prepare(2).shape == (1, 40, 40) and "constant_test" in list_modalities()
    with pytest.raises(ModalityError, match="already registered"):
        register_modality("image")(Constant)
    with pytest.raises(ModalityError, match="JSON-serialisable"):
        Constant(size=object())


@pytest.mark.parametrize("fmt, suffix, mode", [
    ("JPEG", "jpg", "RGB"), ("PNG", "png", "RGB"), ("PNG", "png", "RGBA"), ("PNG", "png", "L"),
    ("PNG", "png", "LA"), ("PNG", "png", "P"), ("WEBP", "webp", "RGB"), ("BMP", "bmp", "RGB"),
    ("TIFF", "tif", "RGB"), ("GIF", "gif", "P"),
])
def test_every_format_loads_as_rgb(tmp_path, fmt, suffix, mode):
    image = Image.fromarray(gradient_image()).convert(mode)
    path = tmp_path / f"picture.{suffix}"
    image.save(path, format=fmt)
    adapter = ImageAdapter(image_size=32)
    raw = adapter.load(path)
    assert raw.mode == "RGB" and raw.size == (64, 48)
    sample = adapter.preprocess(raw)
    assert sample.shape == (3, 32, 32) and sample.dtype == torch.float32 and torch.isfinite(sample).all()
    # the same file as bytes and as a file object
    data = path.read_bytes()
    assert torch.equal(adapter.prepare(data), sample)
    with open(path, "rb") as f:
        assert torch.equal(adapter.prepare(f), sample)


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "blink.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    raw = ImageAdapter(image_size=32).load(path)
    assert raw.getpixel((20, 20)) == (255, 0, 0)


def test_16_bit_images_keep_their_full_range(tmp_path):
    array = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(array).save(path)
    raw = ImageAdapter(image_size=32).load(path)
    pixels = np.asarray(raw)
    assert pixels.min() == 0 and pixels.max() == 255 and (pixels[..., 0] == pixels[..., 2]).all()


def test_arrays_and_tensors():
    adapter = ImageAdapter(image_size=32)
    rgb = gradient_image()
    from_array = adapter.prepare(rgb)
    from_tensor = adapter.prepare(torch.from_numpy(rgb).permute(2, 0, 1))
    from_float = adapter.prepare(rgb.astype(np.float32) / 255)
    assert torch.equal(from_array, from_tensor) and torch.allclose(from_array, from_float)
    assert adapter.prepare(rgb[..., 0]).shape == (3, 32, 32)          # grey (H, W)
    assert adapter.prepare(np.dstack([rgb, rgb[..., :1]])).shape == (3, 32, 32)  # RGBA


def test_eval_transform_resizes_then_centre_crops_and_normalises():
    adapter = ImageAdapter(image_size=64)
    # a 128x96 image whose centre 64x64 after resizing to short side 73 (64 / 0.875) is a known colour block
    image = np.zeros((96, 128, 3), dtype=np.uint8)
    image[:, :, 0] = 255
    sample = adapter.prepare(image)
    assert sample.shape == (3, 64, 64)
    expected = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                             -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    assert torch.allclose(sample.mean(dim=(1, 2)), expected, atol=1e-3)
    # the crop keeps the centre: a left-to-right ramp keeps its middle value in the middle column
    ramp = ImageAdapter(image_size=32, crop_pct=0.5).prepare(gradient_image(128, 128))
    red = ramp[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert abs(red[:, 16].mean().item() - 0.5) < 0.02 and red[:, 0].mean() > 0.2 and red[:, -1].mean() < 0.8


def test_large_sizes_resize_straight_without_cropping():
    adapter = ImageAdapter(image_size=384)
    ramp = adapter.prepare(gradient_image(200, 100))
    red = ramp[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert ramp.shape == (3, 384, 384)
    assert red[:, 0].mean() < 0.01 and red[:, -1].mean() > 0.99  # the whole width survives


def test_train_transform_is_random_and_has_the_eval_shape():
    adapter = ImageAdapter(image_size=48)
    image = gradient_image(80, 60)
    torch.manual_seed(0)
    first, second = adapter.prepare(image, train=True), adapter.prepare(image, train=True)
    assert first.shape == second.shape == (3, 48, 48)
    assert not torch.equal(first, second)
    batch = adapter.collate([first, second])
    assert batch.shape == (2, 3, 48, 48) and torch.equal(adapter(batch), batch)


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(gradient_image(200, 200)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidInputError, match="cut.png: not a readable image"):
        ImageAdapter().load(path)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((4, 10, 10, 3), np.uint8), "expected an image array"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), 7.0, np.float32), r"values in \[0, 1\]"),
    (np.zeros((8, 8, 3), np.int16), "signed integer"),
])
def test_bad_arrays_raise_invalid_input(array, message):
    with pytest.raises(InvalidInputError, match=message):
        ImageAdapter().load(array)


def test_collate_and_forward_refuse_mismatched_input():
    adapter = ImageAdapter(image_size=32)
    with pytest.raises(InvalidInputError, match="different shapes"):
        adapter.collate([torch.zeros(3, 32, 32), torch.zeros(3, 40, 40)])
    with pytest.raises(InvalidInputError, match="empty list"):
        adapter.collate([])
    with pytest.raises(InvalidInputError, match=r"\(B, 3, H, W\)"):
        adapter(torch.zeros(2, 1, 32, 32))


def install_plugin(folder, monkeypatch, distribution, entry_point):
    """Make ``folder`` an installed distribution declaring one modality entry point, and forget loaded plugins."""
    import modalities.base as base

    dist = folder / f"{distribution}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[uniperception.modalities]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(base, "_ENTRY_POINTS_LOADED", False)


def test_adapters_from_installed_packages_register_through_entry_points(tmp_path, monkeypatch):
    """A real installed distribution (a dist-info folder on sys.path) adds a modality without touching this repo."""
    import sys

    import modalities.base as base

    (tmp_path / "smell_plugin.py").write_text(
        "import torch\n"
        "from modalities import ModalityAdapter\n"
        "class SmellAdapter(ModalityAdapter):\n"
        "    def __init__(self, size=32):\n"
        "        super().__init__(size=size)\n"
        "        self.size = size\n"
        "    @property\n"
        "    def out_channels(self):\n"
        "        return 2\n"
        "    def load(self, source):\n"
        "        return torch.as_tensor(source, dtype=torch.float32)\n"
        "    def preprocess(self, raw):\n"
        "        return raw.view(2, 1, 1).expand(2, self.size, self.size).clone()\n"
    )
    install_plugin(tmp_path, monkeypatch, "smell_plugin", "smell = smell_plugin:SmellAdapter")
    try:
        assert "smell" in list_modalities()
        adapter = create_adapter("smell", size=40)
        assert adapter.name == "smell" and adapter.prepare([0.5, 1.5]).shape == (2, 40, 40)
    finally:
        base._REGISTRY.pop("smell", None)
        sys.modules.pop("smell_plugin", None)


def test_a_broken_plugin_warns_and_leaves_the_built_in_modalities(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "broken_plugin", "broken = no_such_module:Adapter")
    with pytest.warns(RuntimeWarning, match="modality plugin 'broken'"):
        names = list_modalities()
    assert {"image", "audio", "video"} <= set(names) and "broken" not in names


def test_more_image_edge_cases(tmp_path):
    adapter = ImageAdapter(image_size=32)
    # bfloat16 tensors in [0, 1]
    assert adapter.prepare(torch.rand(3, 40, 40).to(torch.bfloat16)).shape == (3, 32, 32)
    # a 32-bit float TIFF is rescaled from its own range
    values = np.linspace(-5.0, 20.0, 40 * 50, dtype=np.float32).reshape(40, 50)
    path = tmp_path / "field.tif"
    Image.fromarray(values, mode="F").save(path)
    pixels = np.asarray(adapter.load(path))
    assert pixels.min() == 0 and pixels.max() == 255
    # an image too large to decode safely names the file
    big = tmp_path / "huge.png"
    Image.new("L", (20000, 20000)).save(big)
    with pytest.raises(InvalidInputError, match="huge.png: not a readable image"):
        adapter.load(big)



def test_randaugment_at_full_magnitude_runs():
    """timm's RandAugment posterizes to 0 bits at magnitude 10, which Pillow 13 refuses (hence pillow<13)."""
    import random

    adapter = ImageAdapter(image_size=32, auto_augment="rand-m10-mstd0-inc1-n3")
    image = gradient_image(40, 40)
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(60):  # posterize is drawn in a fifth of these steps
        assert adapter.prepare(image, train=True).shape == (3, 32, 32)
