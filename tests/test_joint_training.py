"""One model, several modalities: joint training with one shared backbone (both schedules, per-modality metrics,
exact resume), and predict/embed on a mix of modalities. Data: PNG images written with Pillow and WAV clips written
with soundfile, two classes each."""

import json
import shutil

import numpy as np
import pytest
import soundfile
import torch

from test_engine import write_two_classes
from uniperception import UniPerceiver
from uniperception.data import FolderDataset
from uniperception.engine import TrainConfig, Trainer, TrainingError, modality_schedule
from uniperception.errors import UniPerceptionError

RATE = 16000


def write_tones(root, per_class=4):
    """Short noisy tones: 300 Hz (class a) or 3000 Hz (class b), the classes of test_engine's images."""
    rng = np.random.default_rng(1)
    t = np.arange(int(0.4 * RATE)) / RATE
    for name, frequency in (("a", 300.0), ("b", 3000.0)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wave = 0.5 * np.sin(2 * np.pi * frequency * (1 + 0.02 * i) * t) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(root / name / f"{i}.wav", wave.astype(np.float32), RATE)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    return {"image": write_two_classes(root / "image"), "audio": write_tones(root / "audio")}


def joint_setup(data, output, **config):
    torch.manual_seed(0)
    names = ["a", "b"]
    model = UniPerceiver(["image", "audio"], class_names={"image": names, "audio": names},
                         adapters={"image": dict(image_size=32, crop_pct=1.0, auto_augment=None, re_prob=0.0),
                                   "audio": dict(target_frames=32, num_mel_bins=40, freq_mask=4, time_mask=4)})
    train = {m: FolderDataset(data[m], model.adapters[m], train=True) for m in data}
    val = {m: FolderDataset(data[m], model.adapters[m]) for m in data}
    settings = dict(epochs=2, batch_size=4, lr=2e-3, warmup_epochs=0.5, progress=False, output=str(output))
    settings.update(config)
    return model, train, val, TrainConfig(**settings)


def test_schedules_cover_every_batch_and_depend_only_on_seed_and_epoch():
    batches = {"image": 5, "audio": 2, "video": 3}
    order = modality_schedule(batches, "proportional", seed=0, epoch=0)
    assert {m: order.count(m) for m in batches} == batches
    assert order == modality_schedule(batches, "proportional", seed=0, epoch=0)
    assert order != modality_schedule(batches, "proportional", seed=0, epoch=1)
    assert order != sorted(order)  # interleaved, not one modality after another
    robin = modality_schedule(batches, "round_robin", seed=0, epoch=0)
    assert robin == ["audio", "image", "video"] * 5
    with pytest.raises(UniPerceptionError, match="schedule must be one of"):
        modality_schedule(batches, "random", seed=0, epoch=0)
    with pytest.raises(UniPerceptionError, match="schedule must be one of"):
        TrainConfig(schedule="alternate")


@pytest.mark.parametrize("schedule", ["proportional", "round_robin"])
def test_joint_training_learns_both_modalities_with_per_modality_metrics(data, tmp_path, single_thread, schedule):
    model, train, val, config = joint_setup(data, tmp_path / "run", schedule=schedule, epochs=3)
    assert model.untrained is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = Trainer(model, train, val, config).fit()
    last = history[-1]
    for modality in ("image", "audio"):
        assert 0.0 <= last[f"val_{modality}_top1"] <= 1.0 and np.isfinite(last[f"train_loss_{modality}"])
        # each modality trained its own stem and head, and the shared backbone moved
        stem = f"backbone.downsample_layers.0.0.convs.{modality}.weight"
        assert not torch.equal(before[stem], model.state_dict()[stem])
        assert not torch.equal(before[f"heads.{modality}.fc.weight"], model.state_dict()[f"heads.{modality}.fc.weight"])
    assert last["val_top1"] == pytest.approx((last["val_image_top1"] + last["val_audio_top1"]) / 2)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert model.untrained is None
    run = tmp_path / "run"
    metrics = json.loads((run / "val_metrics.json").read_text())
    assert set(metrics) >= {"image", "audio", "epoch"} and "top1" in metrics["audio"]
    assert (run / "confusion_matrix_image.png").is_file() and (run / "confusion_matrix_audio.png").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_image_top1", "val_audio_top1", "train_loss_image", "train_loss_audio"} <= set(header)


class CopyAfterFirstEpoch(Trainer):
    """Keeps a copy of the run folder as it stood after the first epoch: the state a run killed then leaves."""

    def _write_history(self, metrics):
        super()._write_history(metrics)
        if len(self.history) == 1:
            shutil.copytree(self.output, self.output.with_name("killed"))


def test_a_joint_run_resumes_exactly(data, tmp_path, single_thread):
    model, train, val, config = joint_setup(data, tmp_path / "whole", epochs=2)
    whole = CopyAfterFirstEpoch(model, train, val, config).fit()
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, train, val, config = joint_setup(data, tmp_path / "killed", epochs=2, resume=True)
    resumed = Trainer(model, train, val, config).fit()
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)
    model, train, val, config = joint_setup(data, tmp_path / "killed", epochs=3, resume=True, schedule="round_robin")
    with pytest.raises(TrainingError, match="schedule='proportional'"):
        Trainer(model, train, val, config).fit()


def test_joint_data_must_be_keyed_by_the_models_modalities(data, tmp_path):
    model, train, val, config = joint_setup(data, tmp_path / "run")
    with pytest.raises(UniPerceptionError, match="give train_data as a dict"):
        Trainer(model, train["image"], None, config)
    with pytest.raises(UniPerceptionError, match="keyed by the model's modalities"):
        Trainer(model, {"video": train["image"]}, None, config)
    with pytest.raises(UniPerceptionError, match="without training data"):
        Trainer(model, {"image": train["image"]}, val, config)
    trainer = Trainer(model, {"image": train["image"]}, {"image": val["image"]}, config.__class__(
        **{**config.__dict__, "epochs": 1}))  # one of the model's modalities alone is fine
    assert "val_image_top1" in trainer.fit()[-1]


def test_predict_and_embed_take_a_mix_of_modalities(data):
    model, *_ = joint_setup(data, "unused")
    model.mark_trained()
    image, sound = sorted((data["image"] / "a").iterdir())[0], sorted((data["audio"] / "b").iterdir())[0]
    mixed = [sound, image, sound]
    vectors = model.embed(mixed)
    assert vectors.shape == (3, model.backbone.num_features)
    torch.testing.assert_close(vectors[1], model.embed(image, modality="image"), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vectors[0], vectors[2], rtol=1e-5, atol=1e-6)
    answers = model.predict(mixed)
    assert [a["modality"] for a in answers] == ["audio", "image", "audio"]
    assert [a["source"] for a in answers] == [str(p) for p in mixed]
    by_modality = model.embed({"image": [image], "audio": [sound, sound]})
    assert by_modality["image"].shape == (1, model.backbone.num_features) and by_modality["audio"].shape[0] == 2
    assert model.predict({"audio": [sound]})["audio"][0]["class_name"] in ("a", "b")
    with pytest.raises(UniPerceptionError, match="no modality of this model reads .ply"):
        model.embed([image, image.with_suffix(".ply")])


def test_mixing_can_differ_per_modality(data, tmp_path, single_thread):
    model, train, val, config = joint_setup(data, tmp_path / "run", epochs=1, mixup={"image": 0.8}, cutmix=0.0)
    trainer = Trainer(model, train, val, config)
    history = trainer.fit()
    assert set(trainer.mixups) == {"image"} and np.isfinite(history[-1]["train_loss_audio"])
    with pytest.raises(UniPerceptionError, match="non-negative numbers"):
        TrainConfig(mixup={"image": -1.0})


def test_the_command_line_trains_jointly_from_a_config_file(data, tmp_path, capsys, single_thread):
    import yaml

    from uniperception.cli import main

    config = tmp_path / "joint.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": {
            "image": {"builtin": "digits", "adapter": {"image_size": 32, "auto_augment": None, "re_prob": 0.0}},
            "audio": {"data": str(data["audio"]), "val_data": str(data["audio"]), "adapter": {"target_frames": 32}},
        },
        "epochs": 1, "batch_size": 64, "schedule": "round_robin", "output": str(tmp_path / "run"),
    }))
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "joint training on audio, image (round_robin schedule); mixup {'audio': 0.6, 'image': 0.8}" in out
    saved = tmp_path / "run" / "model"
    model = UniPerceiver.from_pretrained(saved)
    assert model.modalities == ["audio", "image"] and model.class_names["image"] == [str(d) for d in range(10)]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_image_top1", "val_audio_top1", "val_top1"} <= set(header)

    sound = sorted((data["audio"] / "a").iterdir())[0]
    assert main(["predict", "--model", str(saved), "--json", str(sound)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] in ("a", "b") and {name for name, _ in rows[0]["top"]} <= {"a", "b"}

    assert main(["train", "--dataset", "image=digits", "--output", str(tmp_path / "one")]) == 2
    assert "at least two modalities" in capsys.readouterr().err
    assert main(["train", "--dataset", "audio=digits", "--dataset", f"image={data['image']}",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "not a built-in audio classification set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# a shared embedding space: audio aligned to images of the same class


def test_alignment_pulls_audio_to_images_of_its_class(data, tmp_path, single_thread):
    from uniperception.alignment import chance_recall_at_k, contrastive_loss

    model, train, val, config = joint_setup(data, tmp_path / "run", epochs=4, align=1.0, temperature=0.1)
    trainer = Trainer(model, train, val, config)

    def misalignment():
        audio, audio_labels = trainer.embeddings(val["audio"], "audio")
        images, image_labels = trainer.embeddings(val["image"], "image")
        return float(contrastive_loss(audio, images, audio_labels, image_labels, temperature=0.1))

    before = misalignment()
    history = trainer.fit()
    assert trainer.anchor == "image" and set(trainer.partners) == {"audio"}
    last = history[-1]
    for key in ("val_audio_to_image_recall@1", "val_audio_to_image_recall@5", "val_audio_zero_shot_top1",
                "val_recall@1", "val_image_top1", "val_audio_top1"):
        assert 0.0 <= last[key] <= 1.0, key
    audio, audio_labels = trainer.embeddings(val["audio"], "audio")
    images, image_labels = trainer.embeddings(val["image"], "image")
    assert audio.shape == (8, model.backbone.num_features) and images.shape[0] == 12
    assert chance_recall_at_k(audio_labels, image_labels, ks=(1,))["recall@1"] == pytest.approx(0.5)
    assert misalignment() < before  # tones and squares of a class moved towards each other


def test_an_embedding_model_trains_on_alignment_alone_and_resumes_exactly(data, tmp_path, single_thread):
    def setup(output, **config):
        torch.manual_seed(0)
        model = UniPerceiver(["image", "audio"], adapters={
            "image": dict(image_size=32, crop_pct=1.0, auto_augment=None, re_prob=0.0),
            "audio": dict(target_frames=32, num_mel_bins=40, freq_mask=4, time_mask=4)})
        train = {m: FolderDataset(data[m], model.adapters[m], train=True) for m in data}
        val = {m: FolderDataset(data[m], model.adapters[m]) for m in data}
        return model, train, val, TrainConfig(epochs=2, batch_size=4, lr=2e-3, warmup_epochs=0.5, progress=False,
                                              output=str(output), align=1.0, **config)

    model, train, val, config = setup(tmp_path / "whole")
    assert model.task == "embedding"
    whole = CopyAfterFirstEpoch(model, train, val, config).fit()
    assert "train_loss_image" not in whole[-1] and np.isfinite(whole[-1]["train_loss_audio"])
    assert "val_recall@1" in whole[-1] and "val_image_top1" not in whole[-1]
    final = {k: v.clone() for k, v in model.state_dict().items()}
    model, train, val, config = setup(tmp_path / "killed", resume=True)
    resumed = Trainer(model, train, val, config).fit()
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)

    model, train, val, _ = setup(tmp_path / "plain")
    with pytest.raises(UniPerceptionError, match="align it with another modality"):
        Trainer(model, train, val, TrainConfig(epochs=1, output=str(tmp_path / "plain")))
    with pytest.raises(UniPerceptionError, match=r"turn them off for \['audio'\]"):
        Trainer(model, train, val, TrainConfig(epochs=1, align=1.0, mixup=0.5, output=str(tmp_path / "x")))
    with pytest.raises(UniPerceptionError, match="align_to='video' has no training data"):
        Trainer(model, train, val, TrainConfig(epochs=1, align=1.0, align_to="video", output=str(tmp_path / "y")))


def test_each_modality_keeps_its_own_batchnorm_statistics(data, tmp_path, single_thread):
    model, train, val, config = joint_setup(data, tmp_path / "run", epochs=1)
    statistics = model.modality_statistics
    assert statistics is not None and len(statistics.layers) > 0 and not statistics.differ()
    Trainer(model, train, val, config).fit()
    assert statistics.differ()  # spectrograms and photos moved their layers' statistics apart
    model.eval()
    batches = {m: model.adapters[m].collate([val[m][i][0] for i in range(3)]) for m in val}
    with torch.no_grad():
        first = {m: model(batches[m], modality=m) for m in batches}
        again = {m: model(batches[m], modality=m) for m in reversed(list(batches))}  # the order does not matter
        loaded = UniPerceiver.from_pretrained(model.save_pretrained(tmp_path / "saved"))
        for m in batches:
            torch.testing.assert_close(again[m], first[m], rtol=0, atol=0)
            torch.testing.assert_close(loaded(batches[m], modality=m), first[m], rtol=0, atol=0)
    with pytest.raises(UniPerceptionError, match="own BatchNorm statistics"):
        model.reparameterize()
