"""Data-parallel training: synchronous BatchNorm on the CPU, two torchrun processes against one, TensorBoard."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from uniperception import UniPerceiver
from uniperception.distributed import (
    DistributedState,
    SyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
    shard,
)
from uniperception.engine import TrainConfig, Trainer, TrainingError
from uniperception.errors import UniPerceptionError

ROOT = Path(__file__).resolve().parents[1]


def _sync_bn_worker(rank: int, world: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = torch.randn(6, 5, 7, 3, dtype=torch.float64) * 3 + 2  # every process builds the same global batch
    weights = torch.randn(6, 5, 7, 3, dtype=torch.float64)
    norm = convert_sync_batchnorm(nn.BatchNorm2d(5).double(), torch.device("cpu"))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    local = full[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    out = norm(local)
    (out * weights[rank * 3:(rank + 1) * 3]).sum().backward()
    grads = torch.stack([norm.weight.grad, norm.bias.grad])
    dist.all_reduce(grads)  # what DistributedDataParallel sums (then averages) over the processes
    torch.save({"out": out.detach(), "grad_x": local.grad, "grads": grads, "mean": norm.running_mean,
                "var": norm.running_var, "cls": type(norm).__name__}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_sync_batchnorm_on_the_cpu_equals_batchnorm_over_the_global_batch(tmp_path):
    mp.spawn(_sync_bn_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2)
    parts = [torch.load(tmp_path / f"result.{rank}") for rank in range(2)]
    assert parts[0]["cls"] == "SyncBatchNorm"

    torch.manual_seed(0)
    full = (torch.randn(6, 5, 7, 3, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    weights = torch.randn(6, 5, 7, 3, dtype=torch.float64)
    norm = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    out = norm(full)
    (out * weights).sum().backward()
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach())
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]), full.grad)  # gradients cross processes
    for part in parts:
        torch.testing.assert_close(part["grads"], torch.stack([norm.weight.grad, norm.bias.grad]))
        torch.testing.assert_close(part["mean"], norm.running_mean)
        torch.testing.assert_close(part["var"], norm.running_var)  # the unbiased variance, as BatchNorm2d keeps


def test_sync_batchnorm_outside_a_process_group_is_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 5)
    plain = nn.BatchNorm2d(3)
    synced = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced, SyncBatchNorm)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


def test_converting_batchnorm_keeps_parameters_and_reverts_for_reparameterisation():
    model = UniPerceiver("image", num_classes=3, image_size=32)
    before = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    convert_sync_batchnorm(model, torch.device("cpu"))
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert all(before[name] is p for name, p in model.named_parameters())  # an optimizer built before stays valid
    assert all(buffers[name] is b for name, b in model.named_buffers())
    revert_sync_batchnorm(model)
    assert not any(isinstance(m, SyncBatchNorm) for m in model.modules())
    assert all(before[name] is p for name, p in model.named_parameters())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    torch.testing.assert_close(model.reparameterize()(x), reference, rtol=1e-4, atol=1e-5)


def test_evaluation_shards_cover_every_index_once():
    shares = [shard(11, DistributedState(world_size=3, rank=r)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(11))
    assert shard(5, None) == list(range(5))


def write_series_classes(root: Path, per_class: int = 16, length: int = 48) -> Path:
    """Noisy sine waves, slow (period 24) or fast (period 6), one CSV file each."""
    rng = np.random.default_rng(0)
    steps = np.arange(length)
    for name, frequency in (("slow", 1 / 24), ("fast", 1 / 6)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            wave = np.sin(2 * np.pi * frequency * steps + rng.uniform(0, 6)) + 0.3 * rng.standard_normal(length)
            pd.DataFrame({"value": wave}).to_csv(root / name / f"{i}.csv", index=False)
    return root


TRAIN = ["train", "--modality", "time_series", "--epochs", "2", "--lr", "2e-3", "--adapter", "length=48",
         "--adapter", "jitter=0", "--adapter", "scaling=0", "--label-smoothing", "0", "--sync-bn", "--seed", "3"]


def assert_same_weights(one: Path, two: Path) -> None:
    """The models saved by the runs in ``one`` and ``two`` hold the same tensors up to float32 summation order."""
    single = load_file(one / "model" / "model.safetensors")
    parallel = load_file(two / "model" / "model.safetensors")
    assert single.keys() == parallel.keys()
    for name in single:
        # float32 sums in another order, through 8 AdamW updates; per-process BatchNorm (no --sync-bn) moves the
        # running variances by more than 1 and the weights by more than 1e-2
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-3, atol=1e-3, msg=name)


def _run(command, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_torchrun_processes_train_the_weights_of_one_process_with_the_global_batch(tmp_path):
    data = write_series_classes(tmp_path / "data")
    one = _run([sys.executable, "-m", "uniperception", *TRAIN, "--data", str(data), "--batch-size", "8",
                "--output", str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "uniperception", *TRAIN, "--data", str(data), "--batch-size", "4",
                "--output", str(tmp_path / "two")], tmp_path)
    assert one.stdout.count("trained 2 epoch(s)") == 1
    assert two.stdout.count("trained 2 epoch(s)") == 1  # rank 0 alone reports and saves

    assert_same_weights(tmp_path / "one", tmp_path / "two")
    history_one = pd.read_csv(tmp_path / "one" / "metrics.csv")
    history_two = pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert list(history_two["epoch"]) == [0, 1]  # one writer
    np.testing.assert_allclose(history_two["train_loss"], history_one["train_loss"], rtol=1e-5)
    state = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    # the saved model is an ordinary one: it loads, answers and re-parameterises
    model = UniPerceiver.from_pretrained(tmp_path / "two" / "model")
    assert model.predict(str(next((data / "fast").iterdir())))["class_name"] in ("slow", "fast")
    model.reparameterize()


def _series_setup(root: Path, **config):
    from uniperception.data import FolderDataset

    torch.manual_seed(0)
    model = UniPerceiver("time_series", num_classes=2, length=48, jitter=0.0, scaling=0.0)
    adapter = model.adapters["time_series"]
    settings = dict(epochs=2, batch_size=8, lr=2e-3, progress=False, output=str(root / "run"))
    settings.update(config)
    return model, FolderDataset(root / "data", adapter, train=True), FolderDataset(root / "data", adapter), \
        TrainConfig(**settings)


def test_tensorboard_events_hold_every_update_and_every_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_series_classes(tmp_path / "data", per_class=8)
    model, train, val, config = _series_setup(tmp_path, tensorboard=True, sync_bn=True)
    history = Trainer(model, train, val, config).fit()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/train_loss", "epoch/val_top1", "epoch/val_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # 16 series, batch 8, 2 epochs
    logged = [e.value for e in events.Scalars("epoch/train_loss")]
    np.testing.assert_allclose(logged, [h["train_loss"] for h in history], rtol=1e-6)
    # sync_bn in one process changes nothing and leaves ordinary BatchNorms behind
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_tensorboard_missing_fails_before_training(tmp_path, monkeypatch):
    write_series_classes(tmp_path / "data", per_class=4)
    model, train, val, config = _series_setup(tmp_path, tensorboard=True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        Trainer(model, train, val, config).fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_torchrun_environment_without_its_rendezvous_is_a_clear_error(tmp_path, monkeypatch):
    from uniperception.errors import UniPerceptionError

    write_series_classes(tmp_path / "data", per_class=4)
    model, train, val, config = _series_setup(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UniPerceptionError, match="launch with torchrun"):
        Trainer(model, train, val, config).fit()


def test_batchnorm_subclasses_are_left_alone_with_a_warning():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.BatchNorm2d(4), BatchNormAct2d(4, act_layer=nn.SiLU))
    with pytest.warns(RuntimeWarning, match="BatchNormAct2d unsynchronised"):
        convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[0], SyncBatchNorm) and type(model[1]) is BatchNormAct2d
    assert set(model.state_dict()) == {f"{i}.{k}" for i in (0, 1) for k in
                                       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    revert_sync_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d


def test_metrics_of_shares_merge_into_the_metrics_of_the_whole():
    from uniperception.metrics import ClassificationMetrics, ForecastMetrics

    torch.manual_seed(0)
    logits, labels = torch.randn(20, 6), torch.randint(0, 6, (20,))
    whole, first, second = (ClassificationMetrics(6) for _ in range(3))
    whole.update(logits, labels, loss=1.5)
    first.update(logits[:7], labels[:7], loss=1.5)
    second.update(logits[7:], labels[7:], loss=1.5)
    merged = first.merge(second).compute()
    for key, value in whole.compute().items():
        assert merged[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    forecast, target, history = torch.randn(9, 4, 2), torch.randn(9, 4, 2), torch.randn(9, 8, 2)
    whole, first, second = (ForecastMetrics(season=2) for _ in range(3))
    whole.update(forecast, target, history)
    first.update(forecast[:4], target[:4], history[:4])
    second.update(forecast[4:], target[4:], history[4:])
    assert first.merge(second).compute() == pytest.approx(whole.compute())
    with pytest.raises(UniPerceptionError, match="same season"):
        ForecastMetrics(season=1).merge(ForecastMetrics(season=2))


@pytest.mark.slow
def test_two_torchrun_processes_train_a_joint_model_as_one_process_does(tmp_path):
    """Joint training of two modalities under torchrun: every process takes the same modality order, the unused
    stems and heads of a step do not stall DistributedDataParallel, and the result is one process's."""
    import yaml

    from test_joint_training import write_tones

    config = {
        "datasets": {
            "time_series": {"data": str(write_series_classes(tmp_path / "series")),
                            "adapter": {"length": 48, "jitter": 0, "scaling": 0}},
            # no random augmentation: each process draws its own
            "audio": {"data": str(write_tones(tmp_path / "tones")),
                      "adapter": {"target_frames": 32, "num_mel_bins": 40, "freq_mask": 0, "time_mask": 0,
                                  "time_roll": 0, "noise": 0.0}},
        },
        "epochs": 2, "lr": 2e-3, "label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "sync_bn": True, "seed": 3,
    }
    (tmp_path / "joint.yaml").write_text(yaml.safe_dump(config))
    common = ["train", "--config", str(tmp_path / "joint.yaml")]
    one = _run([sys.executable, "-m", "uniperception", *common, "--batch-size", "8", "--output",
                str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "uniperception", *common, "--batch-size", "4", "--output", str(tmp_path / "two")], tmp_path)
    assert one.stdout.count("trained 2 epoch(s)") == 1 and two.stdout.count("trained 2 epoch(s)") == 1
    history_one = pd.read_csv(tmp_path / "one" / "metrics.csv")
    history_two = pd.read_csv(tmp_path / "two" / "metrics.csv")
    for column in ("train_loss_audio", "train_loss_time_series"):
        np.testing.assert_allclose(history_two[column], history_one[column], rtol=1e-4)
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    model = UniPerceiver.from_pretrained(tmp_path / "two" / "model")
    assert model.modalities == ["audio", "time_series"]
