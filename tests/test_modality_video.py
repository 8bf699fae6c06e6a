"""The video adapter on real clips written by PyAV and Pillow: containers, sampling, layouts, bad input."""


import av
import numpy as np
import pytest
import torch
from PIL import Image

from modalities import InvalidInputError, VideoAdapter, create_adapter
from modalities.image import IMAGENET_MEAN, IMAGENET_STD
from modalities.video import frame_indices


def numbered_frames(count, height=48, width=64):
    """Frame t is a flat grey of level 8*t (+ a bright marker in the top-left quadrant), so decoded frames can be
    identified even after lossy coding."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t] = min(8 * t, 250)
    return frames


def write_video(path, frames, codec, rate=25, pix_fmt="yuv420p", fmt=None):
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_level(frame_map):
    """Undo the normalisation of a (3, S, S) frame and return its mean grey level in 0..255."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((frame_map * std + mean) * 255).mean().item()


@pytest.mark.parametrize("suffix, codec, pix_fmt", [
    ("mp4", "mpeg4", "yuv420p"), ("avi", "mjpeg", "yuvj420p"), ("mkv", "ffv1", "yuv420p"),
    ("webm", "libvpx", "yuv420p"),
])
def test_containers_decode_with_the_right_frames(tmp_path, suffix, codec, pix_fmt):
    path = tmp_path / f"clip.{suffix}"
    write_video(path, numbered_frames(30), codec, pix_fmt=pix_fmt)
    adapter = VideoAdapter(num_frames=4, sampling_rate=2, image_size=32, layout="channels")
    clip = adapter.load(path)
    assert len(clip) == 30 and clip.frames.shape[1:] == (48, 64, 3)
    sample = adapter.preprocess(clip)
    assert sample.shape == (12, 32, 32)
    # centred sampling of 4 frames 2 apart from 30: start 11 -> frames 11, 13, 15, 17 (levels 88..136)
    levels = [frame_level(sample[3 * i: 3 * i + 3]) for i in range(4)]
    assert levels == pytest.approx([88, 104, 120, 136], abs=6)
    assert torch.equal(adapter.prepare(path.read_bytes()), sample)


def test_animated_gif(tmp_path):
    frames = numbered_frames(9)
    path = tmp_path / "clip.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
    clip = VideoAdapter().load(path)
    assert len(clip) == 9
    assert [int(f.mean()) for f in clip.frames] == pytest.approx([8 * t for t in range(9)], abs=2)


def test_frame_sampling_rules():
    assert frame_indices(100, 16, 4, "rate", train=False) == [19 + 4 * i for i in range(16)]
    assert frame_indices(10, 4, 4, "rate", train=False, short_clip="loop") == [0, 4, 8, 2]
    assert frame_indices(10, 4, 4, "rate", train=False, short_clip="pad") == [0, 4, 8, 9]
    assert frame_indices(16, 4, 1, "uniform", train=False) == [2, 6, 10, 14]
    g = torch.Generator().manual_seed(0)
    random_start = frame_indices(100, 16, 4, "rate", train=True, generator=g)
    assert random_start == [random_start[0] + 4 * i for i in range(16)] and 0 <= random_start[0] <= 39
    uniform = frame_indices(16, 4, 1, "uniform", train=True, generator=g)
    assert all(4 * i <= index < 4 * (i + 1) for i, index in enumerate(uniform))
    assert frame_indices(1, 16, 4, "rate", train=False) == [0] * 16


def test_reshape_layout_matches_the_released_memory_reshape():
    adapter = VideoAdapter(num_frames=16, sampling_rate=1, image_size=32, crop_pct=1.0, layout="reshape")
    frames = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    sample = adapter.preprocess(adapter.load(frames))
    assert sample.shape == (3, 128, 128)
    clip = (torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255 - adapter.mean) / adapter.std  # (3,T,S,S)
    for t, y, x in [(0, 0, 0), (5, 7, 31), (15, 31, 0), (9, 13, 17)]:
        row, col = (t * 32 + y) // 4, ((t * 32 + y) % 4) * 32 + x
        assert torch.allclose(sample[:, row, col], clip[:, t, y, x], atol=1e-5)
    assert torch.equal(sample, clip.reshape(3, 128, 128))


def test_grid_layout_is_a_true_mosaic():
    adapter = VideoAdapter(num_frames=9, sampling_rate=1, image_size=32, crop_pct=1.0, layout="grid")
    frames = numbered_frames(9, 32, 32)
    sample = adapter.preprocess(adapter.load(frames))
    assert sample.shape == (3, 96, 96)
    for t in range(9):
        tile = sample[:, (t // 3) * 32:(t // 3 + 1) * 32, (t % 3) * 32:(t % 3 + 1) * 32]
        assert frame_level(tile) == pytest.approx(8 * t, abs=0.5)


def test_channels_layout_and_out_channels():
    adapter = VideoAdapter(num_frames=5, sampling_rate=1, image_size=32, crop_pct=1.0, layout="channels")
    assert adapter.out_channels == 15
    sample = adapter.preprocess(adapter.load(numbered_frames(5, 32, 32)))
    assert [round(frame_level(sample[3 * t:3 * t + 3])) for t in range(5)] == [0, 8, 16, 24, 32]
    with pytest.raises(InvalidInputError, match="must be a square"):
        VideoAdapter(num_frames=5, layout="grid")


def test_resize_short_side_and_centre_crop():
    frames = np.zeros((4, 60, 120, 3), np.uint8)
    frames[:, :, 45:75] = 255  # a bright vertical band in the centre
    adapter = VideoAdapter(num_frames=4, sampling_rate=1, image_size=32, layout="channels", crop_pct=1.0)
    sample = adapter.preprocess(adapter.load(frames))
    level = (sample[:3] * adapter.std[:, 0] + adapter.mean[:, 0]).mean(0)
    assert level[:, 16].mean() > 0.95 and level[:, 0].mean() < 0.05  # resized to 32x64, cropped to the middle


def test_training_crop_and_flip_are_shared_by_all_frames():
    frames = np.zeros((16, 40, 40, 3), np.uint8)
    frames[:, :, :20] = 255  # left half bright in every frame
    adapter = VideoAdapter(num_frames=16, sampling_rate=1, image_size=32, layout="channels", hflip=1.0)
    torch.manual_seed(0)
    sample = adapter.prepare(frames, train=True)
    per_frame = sample.view(16, 3, 32, 32)
    assert all(torch.equal(per_frame[0], per_frame[t]) for t in range(16))
    assert per_frame[0, 0, :, -1].mean() > per_frame[0, 0, :, 0].mean()  # flipped: bright side on the right


def test_long_clips_split_into_windows_and_config_round_trip():
    adapter = VideoAdapter(num_frames=4, sampling_rate=2, image_size=32)
    windows = adapter.windows(adapter.load(numbered_frames(40, 32, 32)))
    assert len(windows) == 5 and all(w.shape == (3, 64, 64) for w in windows)
    assert create_adapter("video", **adapter.config).config == adapter.config


def test_truncated_file_and_audio_only_file(tmp_path):
    whole = tmp_path / "whole.mp4"
    write_video(whole, numbered_frames(20), "mpeg4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(InvalidInputError, match="cut.mp4"):
        VideoAdapter().load(cut)
    sound = tmp_path / "sound.wav"
    import soundfile

    soundfile.write(sound, np.zeros(1600, np.float32), 16000)
    with pytest.raises(InvalidInputError, match="no video stream"):
        VideoAdapter().load(sound)


@pytest.mark.parametrize("frames, message", [
    (np.zeros((0, 8, 8, 3), np.uint8), "no frames"),
    (np.zeros((8, 8, 3), np.uint8), "expected frames"),
    (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 8, 8, 3), np.int64), "unsupported frame dtype"),
])
def test_bad_arrays(frames, message):
    with pytest.raises(InvalidInputError, match=message):
        VideoAdapter().load(frames)


def test_too_long_clips_are_refused(tmp_path):
    path = tmp_path / "long.mp4"
    write_video(path, numbered_frames(12), "mpeg4")
    with pytest.raises(InvalidInputError, match="max_frames=10"):
        VideoAdapter(max_frames=10).load(path)


def test_large_frames_are_scaled_down_while_decoding(tmp_path):
    path = tmp_path / "big.mp4"
    write_video(path, np.zeros((3, 240, 320, 3), np.uint8), "mpeg4")
    clip = VideoAdapter(image_size=32).load(path)
    assert clip.frames.shape[1:] == (64, 85, 3)


def test_adapter_on_another_device_or_dtype_still_preprocesses_on_cpu():
    adapter = VideoAdapter(num_frames=4, sampling_rate=1, image_size=32).to(torch.float64)
    sample = adapter.preprocess(adapter.load(numbered_frames(4, 32, 32)))
    assert sample.dtype == torch.float32 and sample.device.type == "cpu"
