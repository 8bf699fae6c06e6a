"""The training engine: a real run, resuming after SIGKILL with identical losses, and the ways a run can go wrong."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from uniperception import UniPerceiver
from uniperception.data import FolderDataset, ForecastingDataset
from uniperception.engine import TrainConfig, Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def write_two_classes(root, per_class=6, size=32):
    """Dark images with a bright square top-left (class a) or bottom-right (class b)."""
    rng = np.random.default_rng(0)
    for name, corner in (("a", (slice(0, 12), slice(0, 12))), ("b", (slice(-12, None), slice(-12, None)))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            image[corner] = 220
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def image_setup(root, **config):
    torch.manual_seed(0)  # the model's initial weights (the engine seeds everything after that)
    model = UniPerceiver("image", num_classes=2, image_size=32, crop_pct=1.0, auto_augment=None, re_prob=0.0)
    adapter = model.adapters["image"]
    train = FolderDataset(root, adapter, train=True)
    val = FolderDataset(root, adapter)
    settings = dict(epochs=2, batch_size=4, lr=2e-3, warmup_epochs=0.5, progress=False, output=str(root.parent /
                                                                                                   "run"))
    settings.update(config)
    return model, train, val, TrainConfig(**settings)


def test_a_run_writes_checkpoints_metrics_and_history(tmp_path, single_thread):
    data = write_two_classes(tmp_path / "data")
    model, train, val, config = image_setup(data, ema_decay=0.9, clip_grad=1.0, accumulation_steps=2)
    trainer = Trainer(model, train, val, config)
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_top1"] <= 100 for h in history)
    run = Path(config.output)
    for name in ("last.pt", "best.pt", "metrics.csv", "history.json", "val_metrics.json", "curves.png",
                 "confusion_matrix.png"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "val_metrics.json").read_text())["confusion_matrix"][0][0] >= 0
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [0, 1]
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["num_updates"] == 2 * 2  # 3 batches per epoch, accumulation 2
    assert state["ema"] is not None and state["optimizer"]["state"]
    assert not list(run.glob(".*.tmp"))


def test_weight_decay_skips_norms_biases_layer_scales_and_grn(tmp_path):
    data = write_two_classes(tmp_path / "data", per_class=2)
    model, train, val, config = image_setup(data)
    trainer = Trainer(model, train, val, config)
    trainer._build(steps_per_epoch=1)
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    assert "backbone.stages.0.0.gamma" not in decayed_names and "backbone.stages.0.0.act.1.gamma" not in \
        decayed_names
    assert not any(n.endswith(".bias") or ".norm." in n for n in decayed_names)
    assert "backbone.stages.0.0.pwconv1.1.weight" in decayed_names and "heads.image.fc.weight" in decayed_names


RUN_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from pathlib import Path
    from test_engine import image_setup
    from uniperception.engine import Trainer
    model, train, val, config = image_setup(Path({data!r}), epochs=4, output={output!r}, resume=True)
    Trainer(model, train, val, config).fit()
""")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_with_the_same_losses(tmp_path, single_thread):
    data = write_two_classes(tmp_path / "data")
    model, train, val, config = image_setup(data, epochs=4, output=str(tmp_path / "uninterrupted"))
    reference = Trainer(model, train, val, config).fit()

    output = tmp_path / "killed"
    script = RUN_SCRIPT.format(tests=str(ROOT / "tests"), data=str(data), output=str(output))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (output / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    time.sleep(0.3)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = torch.load(output / "last.pt", weights_only=False)["epoch"]
    assert done < 3  # killed before the end

    model, train, val, config = image_setup(data, epochs=4, output=str(output), resume=True)
    resumed = Trainer(model, train, val, config).fit()
    assert [h["epoch"] for h in resumed] == [0, 1, 2, 3]
    for a, b in zip(reference, resumed, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"], (a, b)


def test_a_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    data = write_two_classes(tmp_path / "data", per_class=2)
    model, train, val, config = image_setup(data, epochs=1)
    Trainer(model, train, val, config).fit()
    before = (Path(config.output) / "last.pt").read_bytes()
    model, train, val, config = image_setup(data, epochs=2, resume=True)
    with torch.no_grad():
        model.heads["image"].fc.bias.fill_(float("nan"))
    trainer = Trainer(model, train, val, config)
    trainer.model.load_state_dict = lambda *a, **k: None  # keep the NaN bias when resuming
    with pytest.raises(TrainingError, match="the loss became nan in epoch 2.*last checkpoint .*last.pt.* intact"):
        trainer.fit()
    assert (Path(config.output) / "last.pt").read_bytes() == before


def test_an_unwritable_output_fails_before_training(tmp_path):
    data = write_two_classes(tmp_path / "data", per_class=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model, train, val, config = image_setup(data, output=str(blocker / "run"))
    trainer = Trainer(model, train, val, config)
    with pytest.raises(TrainingError, match="cannot write the output folder"):
        trainer.fit()
    assert not hasattr(trainer, "optimizer")  # nothing was built or trained


def test_unreadable_samples_are_skipped_and_counted_or_fatal_with_strict_data(tmp_path):
    data = write_two_classes(tmp_path / "data", per_class=3)
    (data / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    model, train, val, config = image_setup(data, epochs=1)
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable sample"):
        history = Trainer(model, train, None, config).fit()
    assert history[0]["skipped"] == 1
    model, train, val, config = image_setup(data, epochs=1, strict_data=True, output=str(tmp_path / "strict"))
    with pytest.raises(Exception, match="broken.png"):
        Trainer(model, FolderDataset(data, model.adapters["image"], strict=True), None, config).fit()


def test_forecasting_run_reports_mae_and_mase(tmp_path):
    steps = np.arange(300)
    frame = pd.DataFrame({"time": pd.date_range("2024-01-01", periods=300, freq="h"),
                          "load": 10 + np.sin(2 * np.pi * steps / 24)})
    model = UniPerceiver("time_series", task="forecasting", num_variables=1, length=32, horizon=4, min_d_model=32)
    adapter = model.adapters["time_series"]
    train = ForecastingDataset(frame, adapter, split="train", stride=4)
    val = ForecastingDataset(frame, adapter, split="val", stride=4)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-3, progress=False, output=str(tmp_path / "run"))
    history = Trainer(model, train, val, config).fit()
    assert {"val_mse", "val_mae", "val_mase"} <= set(history[0])
    assert np.isfinite(history[0]["val_mae"])


@pytest.mark.slow
def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    data = write_two_classes(tmp_path / "data", per_class=3)
    model, train, val, config = image_setup(data, epochs=1, amp="bf16", grad_checkpointing=True)
    history = Trainer(model, train, val, config).fit()
    assert np.isfinite(history[0]["train_loss"]) and np.isfinite(history[0]["val_loss"])
    assert model.backbone.grad_checkpointing
    with pytest.raises(Exception, match="amp='fp16' needs a CUDA device"):
        Trainer(model, train, val, TrainConfig(amp="fp16", device="cpu", output=str(tmp_path / "x")))


def test_channels_last_training_runs_in_that_layout_and_matches_the_default(tmp_path):
    histories = {}
    for channels_last in (False, True):
        root = write_two_classes(tmp_path / f"cl{int(channels_last)}" / "data")
        model, train, val, config = image_setup(root, epochs=1, channels_last=channels_last)
        seen = []
        stem = model.backbone.downsample_layers[0][0]
        stem.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(
            (module.weight.is_contiguous(memory_format=torch.channels_last),
             args[0].is_contiguous(memory_format=torch.channels_last))))
        histories[channels_last] = Trainer(model, train, val, config).fit()
        assert seen and all(layout == (channels_last, channels_last) for layout in seen)
        # a channels-last model saves and loads back, answering like the trained one
        model.save_pretrained(tmp_path / f"saved{int(channels_last)}")
        reloaded = UniPerceiver.from_pretrained(tmp_path / f"saved{int(channels_last)}")
        with torch.no_grad():
            batch = torch.stack([train[i][0] for i in range(2)])
            assert torch.allclose(reloaded.eval()(batch), model.eval()(batch), atol=1e-5)
    plain, fast = histories[False][-1], histories[True][-1]
    assert abs(plain["train_loss"] - fast["train_loss"]) < 1e-3 * max(1.0, abs(plain["train_loss"]))
