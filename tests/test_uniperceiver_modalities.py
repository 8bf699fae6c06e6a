"""UniPerceiver end to end on real files of all five modalities: predict, save and load, the deploy form, ONNX
export, embeddings and batching.

Every file is written by the library that writes such files in practice (Pillow, soundfile, PyAV, open3d, pandas),
and the adapters run with small settings so the whole module stays fast on a CPU.
"""

import av
import numpy as np
import open3d as o3d
import pandas as pd
import pytest
import soundfile
import torch
from PIL import Image

from conftest import randomise_statistics, relative_error
from uniperception import UniPerceiver
from uniperception.errors import UniPerceptionError

CLASSES = ["cat", "dog", "bird"]
MODALITIES = ["image", "audio", "video", "point_cloud", "time_series"]
CASES = MODALITIES + ["forecasting"]  # "forecasting": a time-series model with task="forecasting"
SETTINGS = {
    "image": dict(image_size=64),
    "audio": dict(target_frames=64),
    "video": dict(num_frames=4, sampling_rate=2, image_size=32, layout="reshape"),
    "point_cloud": dict(num_points=64, image_size=32, num_views=2, projection="p2p"),
    "time_series": dict(num_variables=2, length=32, min_d_model=32),
    "forecasting": dict(num_variables=2, length=32, min_d_model=32, horizon=4),
}
# windows of the two files of each modality: the first audio clip (1.5 s, about 148 frames of 10 ms) needs three
# windows of 64 frames; the first video (20 frames) holds two spans of 4 frames taken 2 apart
WINDOWS = {"image": [1, 1], "audio": [3, 1], "video": [2, 1], "point_cloud": [1, 1], "time_series": [1, 1]}
FORECAST_FREQUENCIES = ["15min", "1D"]  # of the two forecasting files


def write_video(path, frames, codec="mpeg4", seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
        for t in range(frames):
            frame = np.clip(rng.integers(0, 256, (40, 48, 3)) // 2 + 8 * t, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def series_table(steps, frequency, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    return pd.DataFrame({
        "timestamp": pd.date_range("2024-03-01 06:00", periods=steps, freq=frequency),
        "load": np.sin(t / 3.0 + seed) + 0.1 * rng.standard_normal(steps),
        "temp": 2.0 * np.cos(t / 5.0) + 0.1 * rng.standard_normal(steps),
    })


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is faster than several contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two real files per case, in different formats where the adapter reads several."""
    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    out = {}

    photo, drawing = folder / "photo.png", folder / "drawing.jpg"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(photo)
    ramp = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    Image.fromarray(ramp).save(drawing, quality=90)
    out["image"] = [photo, drawing]

    long_clip, short_clip = folder / "long.ogg", folder / "short.flac"
    soundfile.write(long_clip, (rng.standard_normal((36000, 2)) * 0.1).astype(np.float32), 24000, format="OGG",
                    subtype="VORBIS")
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    soundfile.write(short_clip, tone.astype(np.float32), 16000, format="FLAC")
    out["audio"] = [long_clip, short_clip]

    long_video, short_video = folder / "long.mp4", folder / "short.avi"
    write_video(long_video, 20, seed=1)
    write_video(short_video, 6, seed=2)
    out["video"] = [long_video, short_video]

    cloud, mesh = folder / "cloud.ply", folder / "torus.off"
    points = rng.standard_normal((300, 3)) * np.array([1.0, 0.5, 0.2])
    assert o3d.io.write_point_cloud(str(cloud), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points)))
    assert o3d.io.write_triangle_mesh(str(mesh), o3d.geometry.TriangleMesh.create_torus())
    out["point_cloud"] = [cloud, mesh]

    longer, shorter = folder / "longer.csv", folder / "shorter.parquet"
    series_table(40, "15min", 1).to_csv(longer, index=False)  # cut to 32 steps
    series_table(24, "h", 2).to_parquet(shorter, index=False)  # padded to 32 steps
    out["time_series"] = [longer, shorter]

    quarter_hourly, daily = folder / "quarter_hourly.csv", folder / "daily.parquet"
    series_table(48, FORECAST_FREQUENCIES[0], 3).to_csv(quarter_hourly, index=False)
    series_table(40, FORECAST_FREQUENCIES[1], 4).to_parquet(daily, index=False)
    out["forecasting"] = [quarter_hourly, daily]
    return out


def onnx_runner(onnxruntime, path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def modality_of(case):
    return "time_series" if case == "forecasting" else case


def build(case):
    if case == "forecasting":
        return UniPerceiver(modality="time_series", task="forecasting", **SETTINGS[case])
    return UniPerceiver(modality=case, class_names=CLASSES, **SETTINGS[case])


def preprocessed(model, sources):
    """One preprocessed sample per source (the first window of a long clip)."""
    adapter = model.adapters[model.modalities[0]]
    return [adapter.preprocess(adapter.load(source)) for source in sources]


def windows_of(model, source):
    adapter = model.adapters[model.modalities[0]]
    raw = adapter.load(source)
    if adapter.name in ("audio", "video") and model.task != "forecasting":
        return list(adapter.windows(raw))
    return [adapter.preprocess(raw)]


def check_result(case, source, index, result):
    assert result["source"] == str(source)
    if case == "forecasting":
        table = pd.read_csv(source) if str(source).endswith(".csv") else pd.read_parquet(source)
        stamps = pd.DatetimeIndex(pd.to_datetime(table["timestamp"]))
        assert result["forecast"].shape == (4, 2) and torch.isfinite(result["forecast"]).all()
        assert result["columns"] == ["load", "temp"]
        frequency = FORECAST_FREQUENCIES[index]
        expected = pd.date_range(stamps[-1], periods=5, freq=frequency)[1:]
        assert list(result["timestamps"]) == list(expected)
        assert result["timestamps"][0] - stamps[-1] == pd.Timedelta(frequency)
        return
    probabilities = result["probabilities"]
    assert probabilities.shape == (len(CLASSES),) and probabilities.dtype == torch.float32
    assert torch.all(probabilities >= 0) and abs(probabilities.sum().item() - 1.0) <= 1e-5
    assert 0 <= result["label"] < len(CLASSES) and result["label"] == int(probabilities.argmax())
    assert result["class_name"] == CLASSES[result["label"]]
    assert result["windows"] == WINDOWS[case][index]


def same_answers(first, second, exact=True, atol=0.0):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a["source"] == b["source"]
        key = "forecast" if "forecast" in a else "probabilities"
        if exact:
            assert torch.equal(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol)
        if key == "forecast":
            assert list(a["timestamps"]) == list(b["timestamps"]) and a["columns"] == b["columns"]
        else:
            assert a["windows"] == b["windows"]
            if exact or sorted(a[key].tolist())[-1] - sorted(a[key].tolist())[-2] > 10 * atol:
                assert a["label"] == b["label"] and a["class_name"] == b["class_name"]


# ---------------------------------------------------------------------------------------------------------------------
# 1. raw files -> predict -> save_pretrained -> from_pretrained -> the same predictions


@pytest.mark.parametrize("case", CASES)
def test_predictions_survive_save_and_load(files, tmp_path, case):
    model = build(case)
    randomise_statistics(model.backbone)
    sources = files[case]
    before = model.predict(sources)
    assert isinstance(before, list) and len(before) == len(sources)
    for index, (source, result) in enumerate(zip(sources, before, strict=True)):
        check_result(case, source, index, result)
    if case != "forecasting":  # two different files get two different answers
        assert not torch.allclose(before[0]["probabilities"], before[1]["probabilities"])

    directory = model.save_pretrained(tmp_path / "model")
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    loaded = UniPerceiver.from_pretrained(directory)
    assert loaded.modalities == model.modalities and loaded.task == model.task
    assert loaded.adapters[modality_of(case)].config == model.adapters[modality_of(case)].config
    if case != "forecasting":
        assert loaded.class_names == {case: CLASSES}
    same_answers(before, loaded.predict(sources))
    single = loaded.predict(sources[0])  # one source: one dict (batched alone, so equal up to rounding)
    assert isinstance(single, dict)
    same_answers(before[:1], [single], exact=False, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 2. the deploy form answers as the train form does, and saves and loads


@pytest.mark.parametrize("case", CASES)
def test_deploy_form_agrees_and_round_trips(files, tmp_path, case):
    model = build(case).eval()
    randomise_statistics(model.backbone)
    adapter = model.adapters[modality_of(case)]
    batch = adapter.collate(preprocessed(model, files[case]))
    with torch.no_grad():
        train_form = model(batch)
    assert not model.deploy
    assert model.reparameterize() is model
    assert model.deploy and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    with torch.no_grad():
        deploy_form = model(batch)
    assert deploy_form.shape == train_form.shape
    if case == "forecasting":  # compare the forecasts about each series' level, which would hide errors otherwise
        level = batch[..., :2].mean(dim=1, keepdim=True)
        train_form, deploy_form = train_form - level, deploy_form - level
    assert relative_error(deploy_form, train_form) <= 1e-5

    loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "deploy")).eval()
    assert loaded.deploy
    with torch.no_grad():
        again = loaded(batch)
    if case == "forecasting":
        again = again - level
    assert torch.equal(again, deploy_form)


# ---------------------------------------------------------------------------------------------------------------------
# 3. ONNX export runs in onnxruntime, also at other batch sizes than the example's

# the time-series case is the forecasting model: its graph holds the classifier's embedding and the de-normalisation
@pytest.mark.parametrize("case", ["image", "audio", "video", "point_cloud",
                                  "forecasting"])
def test_onnx_export_matches_pytorch(files, tmp_path, case):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build(case).eval()
    randomise_statistics(model.backbone)
    model.reparameterize()
    adapter = model.adapters[modality_of(case)]
    samples = preprocessed(model, files[case])
    path = model.export_onnx(tmp_path / "export" / f"{case}.onnx", batch=adapter.collate(samples))
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    runner = onnx_runner(onnxruntime, path)
    for size in (1, 3):  # the batch dimension is dynamic
        batch = adapter.collate([samples[i % len(samples)] for i in range(size)])
        (output,) = runner.run(None, {"batch": batch.numpy()})
        with torch.no_grad():
            expected = model(batch).numpy()
        assert output.shape == expected.shape
        assert np.abs(output - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_onnx_export_from_a_one_sample_example(files, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build("image").eval()
    model.reparameterize()
    adapter = model.adapters["image"]
    samples = preprocessed(model, files["image"])
    path = model.export_onnx(tmp_path / "image.onnx", batch=adapter.collate(samples[:1]))
    runner = onnx_runner(onnxruntime, path)
    batch = adapter.collate(samples)
    (output,) = runner.run(None, {"batch": batch.numpy()})
    with torch.no_grad():
        assert np.abs(output - model(batch).numpy()).max() <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# 4. embed: one vector per source, the model's pooled features


@pytest.mark.parametrize("modality", MODALITIES)
def test_embed_is_the_pooled_features(files, modality):
    model = build(modality)
    randomise_statistics(model.backbone)
    model.train()  # embed must switch to eval itself, and restore the mode afterwards
    sources = files[modality]
    width = model.backbone.num_features
    one, many = model.embed(sources[0]), model.embed(sources)
    assert model.training
    assert one.shape == (width,) and many.shape == (len(sources), width)

    model.eval()
    expected = []
    with torch.no_grad():
        for source in sources:
            windows = windows_of(model, source)
            features, context = model.features(model.adapters[modality].collate(windows))
            maps = context["maps_per_sample"]
            assert features.shape == (len(windows) * maps, width)
            expected.append(features.view(len(windows), maps, width).mean(dim=(0, 1)))
    expected = torch.stack(expected)
    torch.testing.assert_close(many, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, expected[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(many[0], many[1], atol=1e-3)


@pytest.mark.parametrize("modality", MODALITIES)
def test_the_call_as_written_is_an_embedding_model(files, modality):
    """``UniPerceiver(modality=m)`` with no other argument embeds files, one vector per file; it warns once that
    its weights are untrained, says so in its repr, and refuses to predict classes it does not have."""
    import warnings

    model = UniPerceiver(modality=modality)
    assert model.task == "embedding" and "UNTRAINED" in repr(model)
    sources = files[modality]
    if modality == "time_series":  # the default adapter reads univariate series
        sources = []
        for index, path in enumerate(files[modality]):
            sources.append(path.with_name(f"univariate{index}.csv"))
            series_table(60 + 20 * index, "1h", index)[["timestamp", "load"]].to_csv(sources[-1], index=False)
    with pytest.warns(UserWarning, match="never trained or loaded"):
        vectors = model.embed(sources)
    assert vectors.shape == (len(sources), model.backbone.num_features) and torch.isfinite(vectors).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        one = model.embed(sources[0])
    torch.testing.assert_close(one, vectors[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(UniPerceptionError, match=r"without classes.*embed\(\).*num_classes"):
        model.predict(sources)


@pytest.mark.parametrize("modality", ["audio", "point_cloud"])
def test_embedding_task_forward_is_the_pooled_features(files, modality):
    model = UniPerceiver(modality=modality, task="embedding", **SETTINGS[modality])
    sources = files[modality]
    vectors = model.embed(sources)
    batch = model.adapters[modality].collate(preprocessed(model, sources))
    with torch.no_grad():
        forward = model.eval()(batch)
        features, context = model.features(batch)
    pooled = features.view(len(sources), context["maps_per_sample"], -1).mean(1)
    torch.testing.assert_close(forward, pooled, rtol=1e-5, atol=1e-5)
    assert vectors.shape == pooled.shape


# ---------------------------------------------------------------------------------------------------------------------
# 5. the batch size does not change the answers


@pytest.mark.parametrize("case", CASES)
def test_batch_size_does_not_change_answers(files, case):
    model = build(case)
    randomise_statistics(model.backbone)
    sources = [files[case][0], files[case][1], files[case][0]]
    small = model.predict(sources, batch_size=2)  # fewer than the windows: batches cut through a clip's windows
    large = model.predict(sources, batch_size=64)
    same_answers(small, large, exact=False, atol=1e-5)
    same_answers(small[:1], small[2:], exact=False, atol=1e-5)

    model.eval()
    for source, result in zip(sources, small, strict=True):  # each answer is its own source's, its windows' mean
        windows = windows_of(model, source)
        with torch.no_grad():
            outputs = model(model.adapters[modality_of(case)].collate(windows))
        if case == "forecasting":
            torch.testing.assert_close(result["forecast"], outputs[0], rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(result["probabilities"], outputs.softmax(-1).mean(0), rtol=0.0, atol=1e-5)
            assert result["windows"] == len(windows)


# ---------------------------------------------------------------------------------------------------------------------
# raw sources the adapters accept


def test_predict_takes_an_audio_waveform_with_its_sample_rate(files):
    model = build("audio")
    waveform, rate = soundfile.read(files["audio"][0], dtype="float32", always_2d=True)
    expected = model.predict(files["audio"][0])
    result = model.predict((waveform.T, rate))
    assert isinstance(result, dict)
    torch.testing.assert_close(result["probabilities"], expected["probabilities"], rtol=0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# other timm backbones


def test_timm_backbone_with_a_pre_logits_layer_predicts(files):
    model = UniPerceiver(modality="image", backbone="mobilenetv3_small_050", class_names=CLASSES, image_size=64)
    result = model.predict(files["image"][0])
    check_result("image", files["image"][0], 0, result)


def test_reparameterised_timm_backbone_saves_and_loads(files, tmp_path):
    model = UniPerceiver(modality="image", backbone="mobileone_s0", class_names=CLASSES, image_size=64).eval()
    batch = model.adapters["image"].collate(preprocessed(model, files["image"]))
    with torch.no_grad():
        train_form = model(batch)
        deploy_form = model.reparameterize()(batch)
    assert relative_error(deploy_form, train_form) <= 1e-5
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "mobileone")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch), deploy_form)
