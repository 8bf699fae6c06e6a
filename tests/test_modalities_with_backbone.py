"""The maps each adapter produces are what the backbone takes: real files in, logits out."""

import av
import numpy as np
import pytest
import soundfile
import timm
import torch
from PIL import Image

import backbones  # noqa: F401
from modalities import InvalidInputError, create_adapter


def write_inputs(folder):
    rng = np.random.default_rng(0)
    image = folder / "photo.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
    sound = folder / "sound.ogg"
    soundfile.write(sound, (rng.standard_normal((24000, 2)) * 0.1).astype(np.float32), 24000, format="OGG",
                    subtype="VORBIS")
    clip = folder / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for t in range(12):
            frame = np.full((40, 48, 3), 20 * t, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {"image": (image, dict(image_size=64)), "audio": (sound, dict(target_frames=64)),
            "video": (clip, dict(num_frames=4, sampling_rate=2, image_size=32))}


@pytest.mark.parametrize("layout", ["reshape", "grid", "channels"])
def test_every_adapter_feeds_the_backbone(tmp_path, layout):
    for modality, (path, config) in write_inputs(tmp_path).items():
        if modality == "video":
            config = dict(config, layout=layout)
        adapter = create_adapter(modality, **config)
        batch = adapter(adapter.collate([adapter.prepare(path), adapter.prepare(path, train=True)]))
        model = timm.create_model("unireplknet_a", in_chans=adapter.out_channels, num_classes=3).eval()
        with torch.no_grad():
            logits = model(batch)
        assert logits.shape == (2, 3) and torch.isfinite(logits).all(), modality


def test_video_file_without_frames(tmp_path):
    path = tmp_path / "blank.mkv"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # writes the header of a stream that never gets a frame
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size > 0
    with pytest.raises(InvalidInputError, match="blank.mkv: the (clip has no frames|file ends before any frame)"):
        create_adapter("video").load(path)


@pytest.mark.parametrize("modality, name, content, message", [
    ("image", "missing.png", None, "no such image file"),
    ("image", "empty.png", b"", "the file is empty"),
    ("image", "text.jpg", b"not an image", "not a readable image"),
    ("audio", "missing.wav", None, "no such audio file"),
    ("audio", "empty.wav", b"", "the file is empty"),
    ("audio", "text.flac", b"definitely not audio" * 20, "not a readable audio file"),
    ("video", "missing.mp4", None, "no such video file"),
    ("video", "empty.mp4", b"", "the file is empty"),
    ("video", "junk.mkv", b"\x1aE\xdf\xa3 this is not a matroska file" * 10, "not a readable video"),
    ("point_cloud", "missing.ply", None, "no such point-cloud file"),
    ("point_cloud", "empty.pcd", b"", "the file is empty"),
    ("point_cloud", "junk.ply", b"not a ply file\n" * 5, r"not a readable \.ply file \(open3d: .*PLY failed"),
    ("time_series", "missing.csv", None, "no such time series file"),
    ("time_series", "empty.csv", b"", "the file is empty"),
    ("time_series", "broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
])
def test_bad_files_raise_invalid_input_naming_the_file(tmp_path, modality, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as info:
        create_adapter(modality).load(path)
    assert str(path) in str(info.value)
