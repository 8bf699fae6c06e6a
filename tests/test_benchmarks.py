"""The benchmark scripts run end to end (smoke runs on tiny settings; the numbers are not checked, only the output)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import backbones
from backbones.runtime import reference_ops

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *arguments: str, timeout: int = 600) -> None:
    """Run ``benchmarks/<script>.py`` with ``arguments`` in a fresh interpreter; fail with its output's end."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def benchmark_module(script: str):
    """``benchmarks/<script>.py`` imported (with its folder on the path while it imports its neighbours)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_dwconv_benchmark_writes_a_policy_and_a_report(tmp_path):
    policy, report = tmp_path / "policy.json", tmp_path / "dwconv.md"
    run_benchmark("dwconv", "--quick", "--write-policy", "--policy-path", str(policy), "--verify", "--output",
                  str(report))
    entries = json.loads(policy.read_text())["entries"]
    assert len(entries) == 32  # 4 layer shapes x 2 kernel sizes x 2 layouts x 2 modes at batch 1
    assert {e["mode"] for e in entries} == {"inference", "training"}
    text = report.read_text()
    assert "float32 matmul rate" in text and "Dispatcher (auto) against plain torch" in text


@pytest.mark.slow
def test_dwconv_policy_of_one_mode_keeps_the_other_modes_entries(tmp_path):
    policy = tmp_path / "policy.json"
    kept = {"device": "cpu", "dtype": "float32", "mode": "training", "layout": "channels_last", "batch": 7,
            "channels": 80, "height": 56, "width": 56, "kernel_size": 13, "best": "cpu_direct",
            "times_ms": {"torch": 2.0, "cpu_direct": 1.0}}
    from backbones.ops.policy import cpu_isa

    isa = cpu_isa()
    kept["isa"] = isa
    replaced = dict(kept, mode="inference", batch=9)
    other_isa = dict(replaced, isa="SVE256" if isa != "SVE256" else "AVX2")  # another CPU's: kept
    policy.write_text(json.dumps({"machines": {"cpu SVE256": "elsewhere"}, "entries": [kept, replaced, other_isa]}))
    run_benchmark("dwconv", "--quick", "--modes", "inference", "--backends", "cpu_direct", "--write-policy",
                  "--policy-path", str(policy))
    stored = json.loads(policy.read_text())
    entries = stored["entries"]
    assert kept in entries and other_isa in entries and replaced not in entries
    fresh = [e for e in entries if e["mode"] == "inference" and e != other_isa]
    assert len(fresh) == 16 and all(set(e["times_ms"]) <= {"torch", "cpu_direct"} for e in fresh)
    assert all(e["isa"] == isa for e in fresh) and set(stored["machines"]) == {"cpu SVE256", f"cpu {isa}"}


def layer_flops(model, x, layers) -> dict:
    """FLOPs of each of ``layers`` (convolutions and Linears) in one forward of ``model`` on ``x``, counted from the
    layer's own shapes (2 per multiply-add) by forward hooks on the module path (``reference_ops``)."""
    flops = {}

    def count(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            flops[module] = 2 * out.numel() * module.in_channels // module.groups * kernel
        else:
            flops[module] = 2 * out.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad(), reference_ops():  # hooks see every layer on the module path
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return flops


def test_forward_flops_count_every_convolution_and_linear_whatever_runs_them():
    forward_gflops = benchmark_module("backbone").forward_gflops
    import timm

    model = timm.create_model("unireplknet_a", num_classes=10).eval().reparameterize()
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # (at 224 px no kernel reaches past a map, so every tap is computed)
    expected = layer_flops(model, torch.randn(1, 3, 224, 224), layers)
    assert len(expected) == len(layers)
    assert forward_gflops(model, 224) == pytest.approx(sum(expected.values()) / 1e9, rel=1e-9)


@pytest.mark.slow
def test_levers_benchmark_times_every_way(tmp_path):
    report = tmp_path / "levers.md"
    run_benchmark("levers", "--models", "unireplknet_a", "--batch-sizes", "2", "--image-size", "64", "--rounds", "2",
                  "--warmup", "1", "--compile", "--output", str(report))
    text = report.read_text()
    assert "| compiled img/s |" in text and "| all over compiled |" in text
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | float32 | 2 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 15 and all(float(cell) > 0 for cell in cells[4:10])  # all, 4 levers off, compiled
    assert "| no narrow kernels img/s |" in text
    assert all(float(cell.rstrip("x")) > 0 for cell in cells[10:])


def test_ceiling_counts_the_flops_of_every_matrix_multiply_and_depthwise_convolution():
    parts_of = benchmark_module("ceiling").parts_of
    import timm

    model = timm.create_model("unireplknet_a", num_classes=10).eval().reparameterize()
    x = torch.randn(2, 3, 64, 64)
    parts = parts_of(model, x)
    assert [p.name for p in parts] == ["stem", "stage 0", "downsample 1", "stage 1", "downsample 2", "stage 2",
                                       "downsample 3", "stage 3"]
    se_convs = {m for block in model.modules() if hasattr(block, "se") for m in block.se.modules()}
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and m is not model.head and m not in se_convs]  # SE and the classifier are not the parts' GEMMs
    expected = {"gemm": 0, "depthwise": 0}
    for module, flops in layer_flops(model, x, layers).items():  # an independent count from the layers' shapes
        expected["depthwise" if getattr(module, "groups", 1) > 1 else "gemm"] += flops
    assert sum(p.gemm_gflop for p in parts) == pytest.approx(expected["gemm"] / 1e9, rel=1e-9)
    assert sum(p.depthwise_gflop for p in parts) == pytest.approx(expected["depthwise"] / 1e9, rel=1e-9)
    assert all(len(p.gemms) == len(p.gemms_gelu) for p in parts)
    assert len(parts[5].gemms) == 2 * len(model.stages[2]) and len(parts[0].gemms) == 2  # two Linears a block


def test_dwconv_versions_times_an_earlier_source_beside_the_current_one(tmp_path):
    from backbones.ops.cpu_depthwise import SOURCE

    earlier = tmp_path / "depthwise_cpu.cpp"
    earlier.write_bytes(SOURCE.read_bytes())  # the same source: no second build, the same bits
    report = tmp_path / "versions.md"
    run_benchmark("dwconv_versions", "--base-source", str(earlier), "--quick", "--bf16", "--output", str(report))
    rows = [line for line in report.read_text().splitlines() if line.startswith("| 2 | 16 |")]
    assert len(rows) == 6  # three cases, two dtypes
    assert all(line.count("same bits") == 2 for line in rows)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    for arguments, message in [(["--base-source", str(tmp_path / "missing.cpp")], "no such file"),
                               (["--base", "no-such-revision"], "git cannot show"),
                               (["--base-source", str(broken)], "building the base kernels")]:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dwconv_versions.py"), *arguments,
                               "--quick"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_ceiling_benchmark_splits_the_time_and_states_the_ceilings(tmp_path):
    report = tmp_path / "ceiling.md"
    run_benchmark("ceiling", "--models", "unireplknet_a", "--batch-sizes", "2", "--image-size", "64", "--rounds",
                  "2", "--warmup", "1", "--output", str(report))
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| unireplknet_a | float32 | 2 |")]
    assert len(rows) == 10 and "**whole model**" in rows[-1]  # 8 parts, the head, the whole
    cells = [cell.strip() for cell in rows[-1].strip("|").split("|")]
    assert float(cells[4]) > 0 and float(cells[7]) > 0 and cells[13].endswith("%")
    assert "the whole model reaches" in text and "with Linear1's GELU as well" in text


@pytest.mark.slow
def test_backbone_benchmark_quick_run(tmp_path):
    report = tmp_path / "backbone.md"
    run_benchmark("backbone", "--quick", "--models", "unireplknet_a", "convnextv2_atto", "--output", str(report))
    text = report.read_text()
    assert "unireplknet_a" in text and "convnextv2_atto" in text and "deploy" in text


@pytest.mark.slow
def test_backbone_benchmark_paired_check(tmp_path):
    report = tmp_path / "paired.md"
    run_benchmark("backbone", "--paired-only", "--models", "unireplknet_a", "--image-size", "64", "--batch-sizes", "2",
                  "--train-batch-size", "3", "--paired-rounds", "3", "--warmup", "1", "--output", str(report))
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | 2 | 3 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    speeds = [float(cells[i]) for i in (3, 4, 5, 11)]  # plain, eager+cl, eager+cl+keep, the peer's fastest
    assert all(speed > 0 for speed in speeds)
    assert cells[6] in ("eager+cl", "eager+cl+keep") and cells[9] == "convnextv2_atto"
    assert cells[10] in ("compiled+cl", "eager+cl+keep", "compiled+cl+keep")
    assert float(cells[7].rstrip("x")) > 0 and float(cells[12].rstrip("x")) > 0 and cells[8].endswith("%")
    assert float(cells[13]) > 0  # the matmul rate timed in the same rounds, which "of matmul" divides by
    assert "UniRepLKNet-A batch 2, paired" in text  # the peer target line
    # the training check: plain, eager, eager+cl, the fastest of ours, over plain, the peer's fastest and over it
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | 3 | 3 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cells[i]) > 0 for i in (3, 4, 5, 10))
    assert cells[6] in ("eager", "eager+cl") and cells[8] == "convnextv2_atto" and cells[9] in ("eager", "eager+cl")
    assert float(cells[7].rstrip("x")) > 0 and float(cells[11].rstrip("x")) > 0
    assert "UniRepLKNet-A training step, batch 3, paired" in text


@pytest.mark.slow
def test_backbone_benchmark_paired_training_check_alone_with_the_compiled_step(tmp_path):
    report = tmp_path / "train.md"
    run_benchmark("backbone", "--train-paired-only", "--train-compiled", "--models", "unireplknet_a", "--image-size",
                  "64", "--train-batch-size", "2", "--paired-rounds", "2", "--warmup", "1", "--output", str(report))
    text = report.read_text()
    assert "Paired check (" not in text  # the training check alone
    assert "| compiled img/s |" in text and "our torch.compile'd step" in text
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | 2 | 2 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cells[i]) > 0 for i in (3, 4, 5, 6, 11))  # plain, eager, eager+cl, compiled, the peer's
    assert cells[7] in ("eager", "eager+cl", "compiled") and cells[9] == "convnextv2_atto"
    assert "UniRepLKNet-A training step, batch 2, paired" in text


@pytest.mark.slow
def test_backbone_benchmark_bfloat16_check(tmp_path):
    report = tmp_path / "bf16.md"
    run_benchmark("backbone", "--bf16-only", "--models", "unireplknet_a", "--image-size", "64", "--batch-sizes", "2",
                  "--paired-rounds", "2", "--warmup", "1", "--output", str(report), timeout=900)
    text = report.read_text()
    if not backbones.native_bfloat16():  # emulated bfloat16 would time the emulation: the report says it is skipped
        assert "bfloat16 check not run: this CPU has no native bfloat16" in text
        assert "bfloat16 matmul rate" not in text and "| unireplknet_a | 2 |" not in text
        return
    assert "bfloat16 matmul rate" in text
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | 2 | 2 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cells[i]) > 0 for i in (3, 4, 5, 12))  # float32, bf16, autocast, the peer's fastest
    assert cells[6] in ("bf16+cl+keep", "autocast+cl+keep") and cells[10] == "convnextv2_atto"
    assert cells[11] in ("bf16+cl+keep", "compiled+bf16+cl+keep", "autocast+cl+keep")
    assert all(float(cells[i].rstrip("x")) > 0 for i in (7, 8, 13)) and cells[9].endswith("%")
    assert float(cells[14]) > 0  # the bfloat16 matmul rate timed in the same rounds
    assert "paired, bfloat16" in text and "over float32 eager+cl+keep" in text


@pytest.mark.slow
def test_backbone_benchmark_measures_training_memory_with_and_without_checkpointing(tmp_path):
    report = tmp_path / "memory.md"
    run_benchmark("backbone", "--memory-only", "--memory-models", "unireplknet_a", "--memory-batch-size", "4",
                  "--image-size", "64", "--output", str(report))
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| unireplknet_a | 4 |"))
    plain, checkpointed = (float(cell) for cell in row.split("|")[3:5])
    assert plain > 0 and checkpointed > 0  # a step allocates activations either way
    assert "reduction with gradient checkpointing" in text


@pytest.mark.slow
def test_preprocess_benchmark_quick_run(tmp_path):
    report = tmp_path / "preprocess.md"
    run_benchmark("preprocess", "--quick", "--output", str(report))
    text = report.read_text()
    for name in ("image 224", "audio 1 s", "audio 10 s", "video 16x224", "point cloud p2p", "point cloud depth",
                 "time series L=96"):
        assert name in text
    assert "train prep / model" in text and "adapter forward (projection / embedding)" in text


@pytest.mark.slow
def test_accuracy_floors_quick(tmp_path):
    """The quick version of benchmarks/accuracy.py: the demos of the cheap sets, trained in full, reach their
    floors (the script exits 1 otherwise)."""
    results = tmp_path / "RESULTS.md"
    run_benchmark("accuracy", "--quick", "--output", str(tmp_path / "runs"), "--results", str(results), timeout=1800)
    text = results.read_text()
    assert "## Demos against their baselines and floors" in text and "| NO |" not in text
    for name in ("digits", "co2"):
        assert f"| {name} |" in text


@pytest.mark.slow
def test_bf16_agreement_on_a_trained_demo_model(tmp_path):
    from uniperception.demo import run_demo

    run_demo("digits", output=str(tmp_path), quick=True, progress=False)  # one epoch: a real, if weak, model
    report = tmp_path / "bf16.md"
    run_benchmark("bf16_agreement", "--runs", str(tmp_path), "--datasets", "digits", "--no-progress", "--output",
                  str(report))
    row = next(line for line in report.read_text().splitlines() if line.startswith("| digits | image |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert int(cells[2]) > 100  # the whole test split
    float32_top1 = float(cells[3].rstrip("%"))
    for agreement, error in ((cells[5], cells[6]), (cells[8], cells[9])):
        assert 90.0 <= float(agreement.split("%")[0]) <= 100.0
        median, largest = (float(value) for value in error.split(" / "))
        assert 0 <= median <= largest < 3e-2
    assert abs(float(cells[4].rstrip("%")) - float32_top1) < 5.0
