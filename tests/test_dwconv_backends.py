"""Depthwise-convolution backends against a float64 reference, and the dispatcher that chooses among them.

Without a GPU the Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest), which is
slow: the kernel cases keep ``planes x K^2`` small, and the larger ones are marked slow.
"""

import json
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from backbones import ConfigurationError, UniRepLKNet
from backbones.ops import available_backends, depthwise_conv2d, reload_policy, select_backend, use_backend
from backbones.ops.fft_depthwise import direct_forward_fft_weight_grad, fft_depthwise_conv2d, smooth_size
from conftest import randomise_statistics, relative_error

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, weight, bias, grad_output):
    """Forward and the three gradients in float64 by PyTorch."""
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, b64, padding=weight.shape[-1] // 2, groups=weight.shape[0])
    y.backward(grad_output.double())
    return y.detach(), x64.grad, w64.grad, None if bias is None else b64.grad


def run_backend(backend, x, weight, bias, grad_output):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = depthwise_conv2d(x, weight, bias, backend=backend)
    y.backward(grad_output)
    return y.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def make_case(batch, channels, height, width, kernel_size, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(channels, 1, kernel_size, kernel_size, generator=g) / kernel_size).to(DEVICE, dtype)
    b = torch.randn(channels, generator=g).to(DEVICE, dtype) if bias else None
    grad_output = torch.randn(batch, channels, height, width, generator=g).to(DEVICE, dtype)
    return x, weight, b, grad_output


def assert_close_to_reference(actual, expected, tolerance):
    for name, a, e in zip(("output", "input grad", "weight grad", "bias grad"), actual, expected):
        if e is None:
            assert a is None
            continue
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        error = (a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-12)
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels

# (B, C, H, W, K): batch 1, C = 1, odd and ragged sizes (tiles are 16 or 32 wide), every kernel size class up to 31
TRITON_CASES = [
    (1, 1, 1, 1, 3),
    (1, 1, 5, 7, 3),
    (2, 3, 17, 16, 5),
    (1, 2, 9, 33, 7),
    (3, 1, 19, 11, 9),
    (1, 3, 12, 12, 13),
    (1, 1, 15, 17, 15),
    (2, 1, 8, 6, 17),
]
TRITON_SLOW_CASES = [(1, 1, 16, 13, 31), (1, 2, 20, 9, 21), (2, 2, 33, 34, 11)]


def triton_random_cases(count, seed=2024):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        k = rng.choice(range(3, 32, 2))
        b, c = rng.choice([1, 1, 2]), rng.choice([1, 2, 3])
        h, w = rng.randint(1, 20), rng.randint(1, 20)
        if b * c * k * k <= 700:  # keeps the interpreter's work bounded
            cases.append((b, c, h, w, k))
    return cases


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", TRITON_CASES + triton_random_cases(4), ids=str)
def test_triton_matches_float64(case):
    x, weight, bias, grad_output = make_case(*case)
    assert_close_to_reference(run_backend("triton", x, weight, bias, grad_output),
                              reference(x, weight, bias, grad_output), 2e-5)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", TRITON_SLOW_CASES, ids=str)
def test_triton_matches_float64_larger_cases(case):
    x, weight, bias, grad_output = make_case(*case, bias=False)
    assert_close_to_reference(run_backend("triton", x, weight, None, grad_output),
                              reference(x, weight, None, grad_output), 2e-5)


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_kernels_write_every_element():
    from backbones.ops.triton_depthwise import depthwise_forward, depthwise_weight_grad, weight_grad_splits

    x, weight, bias, grad_output = make_case(2, 3, 19, 21, 7)
    poisoned = torch.full_like(x, float("nan"))
    y = depthwise_forward(x, weight, bias, out=poisoned)
    assert y.data_ptr() == poisoned.data_ptr() and torch.isfinite(y).all()
    expected = reference(x, weight, bias, grad_output)
    assert relative_error(y.double(), expected[0]) <= 2e-5
    splits, _ = weight_grad_splits(2, 3, 7)
    partial = torch.full((splits, 3, 7, 7), float("nan"), device=DEVICE)
    grad_w = depthwise_weight_grad(x, grad_output, 7, partial=partial)
    assert torch.isfinite(partial).all()
    assert relative_error(grad_w.double(), expected[2]) <= 2e-5


@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision_within_tolerance(dtype, tolerance):
    x, weight, bias, grad_output = make_case(2, 3, 13, 18, 13, dtype=dtype)
    actual = run_backend("triton", x, weight, bias, grad_output)
    assert [t.dtype for t in actual] == [dtype] * 4
    # the reference sees the same rounded inputs; accumulation is float32 inside the kernels
    assert_close_to_reference(actual, reference(x, weight, bias, grad_output), tolerance)


# --------------------------------------------------------------------------------------------------------------------
# FFT backends


@pytest.mark.parametrize("case", [(1, 1, 1, 1, 3), (2, 3, 17, 16, 5), (1, 4, 14, 14, 13), (2, 2, 9, 30, 31),
                                  (3, 5, 7, 7, 17)], ids=str)
@pytest.mark.parametrize("backend", ["fft", "direct_fft_weight_grad"])
def test_fft_backends_match_float64(case, backend):
    x, weight, bias, grad_output = make_case(*case)
    assert_close_to_reference(run_backend(backend, x, weight, bias, grad_output),
                              reference(x, weight, bias, grad_output), 2e-5)


def test_fft_backends_keep_low_precision_dtypes():
    x, weight, bias, grad_output = make_case(2, 3, 12, 12, 13, dtype=torch.bfloat16)
    for fn in (fft_depthwise_conv2d, direct_forward_fft_weight_grad):
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = fn(xg, wg, bg)
        y.backward(grad_output)
        assert y.dtype == xg.grad.dtype == wg.grad.dtype == torch.bfloat16
        assert_close_to_reference((y, xg.grad, wg.grad, bg.grad), reference(x, weight, bias, grad_output), 3e-2)


def test_smooth_fft_sizes():
    assert [smooth_size(n) for n in (1, 7, 11, 19, 31, 37, 61, 67, 97)] == [1, 8, 12, 20, 32, 40, 64, 72, 100]


# --------------------------------------------------------------------------------------------------------------------
# Our CPU kernels

# (B, C, H, W, K): C below, at and past the 16-channel vector (tails of 3, 8 and 1), W past the 14-pixel register
# block, K past the 16-tap group (31), maps smaller than the kernel (down to 2 rows of a 13x13 kernel: all but two
# of its rows skipped), maps cut into several row bands (H = 90), and the kernel sizes whose forward pass keeps a
# kernel row's weights in registers (5, 7 and 13) beside those that do not
CPU_DIRECT_CASES = [(1, 1, 1, 1, 3), (2, 3, 17, 16, 5), (1, 4, 14, 14, 13), (2, 2, 9, 30, 31), (3, 5, 7, 7, 17),
                    (2, 40, 9, 11, 13), (1, 17, 5, 70, 7), (1, 3, 90, 100, 3), (2, 32, 6, 9, 9), (2, 20, 2, 29, 13)]


def cpu_case(*args, **kwargs):
    return tuple(None if t is None else t.cpu() for t in make_case(*args, **kwargs))


def require_cpu_direct():
    from backbones.ops.cpu_depthwise import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CPU kernels are part of the product and must build here: {reason}")


@pytest.mark.parametrize("case", CPU_DIRECT_CASES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_cpu_direct_matches_float64(case, layout):
    require_cpu_direct()
    x, weight, bias, grad_output = cpu_case(*case)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view with gaps: every other column of a wider map
        x = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]
    expected = reference(x, weight, bias, grad_output)
    actual = run_backend("cpu_direct", x, weight, bias, grad_output)
    assert_close_to_reference(actual, expected, 2e-5)
    assert actual[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case, dilation", [((2, 20, 12, 13, 3), 2), ((1, 5, 30, 31, 5), 3), ((2, 16, 7, 9, 3), 5),
                                            ((1, 3, 40, 11, 7), 4), ((2, 18, 9, 20, 7), 2), ((1, 16, 3, 29, 5), 2),
                                            ((1, 16, 6, 9, 7), 97)],  # 7 * 16 + 97 == 13 * 16 + 1: kept apart
                         ids=str)
def test_cpu_direct_dilated_matches_float64(case, dilation):
    from backbones.ops.cpu_depthwise import cpu_direct_depthwise_conv2d

    require_cpu_direct()
    x, weight, bias, grad_output = cpu_case(*case)
    pad = dilation * (weight.shape[-1] // 2)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    expected_y = F.conv2d(x64, w64, b64, padding=pad, dilation=dilation, groups=x.shape[1])
    expected_y.backward(grad_output.double())
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = cpu_direct_depthwise_conv2d(xg, wg, bg, dilation)
    y.backward(grad_output)
    assert_close_to_reference((y.detach(), xg.grad, wg.grad, bg.grad),
                              (expected_y.detach(), x64.grad, w64.grad, b64.grad), 2e-5)


@pytest.mark.parametrize("case", [(2, 20, 12, 13, 13), (1, 16, 14, 14, 7), (3, 5, 7, 9, 3)], ids=str)
def test_cpu_direct_in_bfloat16_is_float32_arithmetic_rounded(case):
    require_cpu_direct()
    x, weight, bias, grad_output = (t.to(torch.bfloat16) for t in cpu_case(*case))
    x = x.contiguous(memory_format=torch.channels_last)
    y, grad_x, grad_w, grad_b = run_backend("cpu_direct", x, weight, bias, grad_output)
    assert y.dtype == grad_x.dtype == grad_w.dtype == grad_b.dtype == torch.bfloat16
    # the same bfloat16 inputs in float32: our outputs are those results rounded once to bfloat16
    expected = run_backend("cpu_direct", x.float(), weight.float(), bias.float(), grad_output.float())
    assert torch.equal(y, expected[0].to(torch.bfloat16))
    assert torch.equal(grad_x, expected[1].to(torch.bfloat16))
    assert relative_error(grad_w.float(), expected[2]) <= 4e-3 and relative_error(grad_b.float(), expected[3]) <= 4e-3
    # and within bfloat16's rounding of the float64 reference
    assert_close_to_reference((y, grad_x, grad_w, grad_b), reference(x, weight, bias, grad_output), 1e-2)


def test_cpu_direct_rounds_to_nearest_even_and_keeps_special_values():
    from backbones.ops.cpu_depthwise import extension

    require_cpu_direct()
    # ties (1 + 2^-8 lies halfway between two bfloat16 values), overflow to infinity, NaN, subnormals, zeros
    values = torch.tensor([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 3.4e38, float("inf"), float("-inf"),
                           float("nan"), 1e-40, 0.0, -0.0, 1.0 + 2 ** -9, 1 + 2 ** -7, 65504.0, -1e-3, 0.1])
    # a 1x1 map of ones in bfloat16 and a float32 3x3 kernel whose centre tap (the only one that meets the map) holds
    # the values: the kernels compute them in float32 and round once to bfloat16
    x = torch.ones(1, 16, 1, 1, dtype=torch.bfloat16)
    weight = torch.zeros(16, 1, 3, 3)
    weight[:, 0, 1, 1] = values
    out = extension().forward(x, weight, None, 1)
    expected = values.to(torch.bfloat16).view(1, 16, 1, 1)  # PyTorch's rounding: to nearest, ties to even
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])


def test_cpu_direct_without_bias_and_gradients_for_some_inputs_only():
    require_cpu_direct()
    x, weight, _, grad_output = cpu_case(2, 20, 12, 13, 13, bias=False)
    expected = reference(x, weight, None, grad_output)
    assert_close_to_reference(run_backend("cpu_direct", x, weight, None, grad_output), expected, 2e-5)
    frozen = weight.detach().requires_grad_(False)
    xg = x.detach().requires_grad_()
    depthwise_conv2d(xg, frozen, backend="cpu_direct").backward(grad_output)
    assert relative_error(xg.grad, expected[1]) <= 2e-5
    wg = weight.detach().requires_grad_()
    depthwise_conv2d(x, wg, backend="cpu_direct").backward(grad_output)
    assert relative_error(wg.grad, expected[2]) <= 2e-5


def test_cpu_direct_weight_gradient_does_not_depend_on_the_thread_count():
    require_cpu_direct()
    x, weight, bias, grad_output = cpu_case(4, 24, 20, 20, 13)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(run_backend("cpu_direct", x, weight, bias, grad_output))
    finally:
        torch.set_num_threads(threads)
    expected = reference(x, weight, bias, grad_output)
    for result in results:
        assert_close_to_reference(result, expected, 2e-5)
    assert torch.equal(results[0][0], results[1][0])  # the forward pass sums in the same order on any thread count


def test_cpu_direct_refuses_second_order_gradients():
    require_cpu_direct()
    x, weight, bias, _ = cpu_case(1, 4, 8, 8, 7)
    x = x.requires_grad_()
    y = depthwise_conv2d(x, weight.requires_grad_(), bias, backend="cpu_direct")
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        grad.sum().backward()


def test_cpu_direct_hands_other_dtypes_to_torch_with_one_warning():
    from backbones.ops.depthwise import clear_decisions

    clear_decisions()
    x, weight, bias, _ = cpu_case(1, 4, 9, 9, 7, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = depthwise_conv2d(x, weight, bias, backend="cpu_direct")
        depthwise_conv2d(x, weight, bias, backend="cpu_direct")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "float32 or bfloat16" in messages[0]
    assert torch.equal(first, F.conv2d(x, weight, bias, padding=3, groups=4))
    clear_decisions()


def test_cpu_direct_that_cannot_be_built_says_why_once_and_torch_runs(monkeypatch, tmp_path):
    import backbones.ops.cpu_depthwise as kernels
    from backbones.ops.depthwise import clear_decisions

    monkeypatch.setattr(kernels, "_MODULE", None)
    monkeypatch.setattr(kernels, "_FAILURE", None)
    monkeypatch.setattr(kernels, "_missing_tools", lambda: "no C++ compiler found (install g++)")
    entry = dict(device="cpu", dtype="float32", mode="inference", layout="nchw", batch=1, channels=4, height=9,
                 width=9, kernel_size=7, best="cpu_direct", times_ms={"torch": 2.0, "cpu_direct": 1.0})
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"entries": [entry]}))
    monkeypatch.setenv("UNIPERCEPTION_DWCONV_POLICY", str(policy))
    reload_policy()
    clear_decisions()
    x, weight, bias, _ = cpu_case(1, 4, 9, 9, 7)
    try:
        assert "no C++ compiler" in kernels.unavailable_reason()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs = [depthwise_conv2d(x, weight, bias), depthwise_conv2d(x, weight, bias, backend="cpu_direct")]
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "unavailable" in messages[0] and "install g++" in messages[0]
        for y in outputs:
            assert torch.equal(y, F.conv2d(x, weight, bias, padding=3, groups=4))
        with pytest.raises(RuntimeError, match="install g\\+\\+"):
            kernels.cpu_direct_depthwise_conv2d(x, weight, bias)
    finally:
        monkeypatch.delenv("UNIPERCEPTION_DWCONV_POLICY")
        reload_policy()


def test_cpu_direct_builds_per_source_and_cpu(monkeypatch):
    import backbones.ops.cpu_depthwise as kernels

    name = kernels._build_name()
    assert name.startswith("uniperception_depthwise_cpu_")
    monkeypatch.setattr(kernels, "_cpu_fingerprint", lambda: "model name : another CPU\nflags : sse2")
    assert kernels._build_name() != name


def test_cpu_direct_command_builds_and_checks_the_kernels():
    import subprocess
    import sys

    require_cpu_direct()
    done = subprocess.run([sys.executable, "-m", "backbones.ops"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "CPU depthwise kernels ready" in done.stdout
    assert "RuntimeWarning" not in done.stderr  # (running the submodule itself as __main__ draws one)


# the last two are over 8 MiB, which the kernel sums pixel row by pixel row (one image: in channel spans, with a tail)
@pytest.mark.parametrize("shape", [(2, 5, 7, 80), (1, 14, 14, 1280), (3, 9, 11, 19), (1, 1, 1, 1), (2, 30, 30, 64),
                                   (2, 64, 64, 328), (1, 48, 48, 1000)], ids=str)
def test_cpu_spatial_square_sum_matches_float64_with_its_gradient(shape):
    from backbones.ops.cpu_depthwise import spatial_square_sum

    require_cpu_direct()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    weights = torch.randn(shape[0], 1, 1, shape[3])
    out = spatial_square_sum(x)
    x64 = x.detach().double().requires_grad_()
    expected = x64.square().sum(dim=(1, 2), keepdim=True)
    assert out.shape == expected.shape == (shape[0], 1, 1, shape[3])
    assert relative_error(out, expected) <= 1e-6
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert relative_error(x.grad, x64.grad) <= 1e-6


# --------------------------------------------------------------------------------------------------------------------
# The dispatcher


def test_every_backend_gives_the_same_result_on_its_supported_calls():
    x, weight, bias, grad_output = make_case(2, 4, 15, 12, 11)
    expected = reference(x, weight, bias, grad_output)
    for backend in available_backends():
        if backend in ("triton",) and DEVICE == "cpu" and not INTERPRETED:
            continue
        assert_close_to_reference(run_backend(backend, x, weight, bias, grad_output), expected, 2e-5)


def test_argument_beats_context_beats_environment(monkeypatch):
    x, weight = torch.randn(1, 2, 8, 8), torch.randn(2, 1, 5, 5)
    monkeypatch.setenv("UNIPERCEPTION_DWCONV_BACKEND", "fft")
    assert select_backend(x, weight) == "fft"
    with use_backend("torch_channels_last"):
        assert select_backend(x, weight) == "torch_channels_last"
        with use_backend("direct_fft_weight_grad"):
            assert select_backend(x, weight) == "direct_fft_weight_grad"
        assert select_backend(x, weight, backend="torch") == "torch"
    assert select_backend(x, weight) == "fft"
    monkeypatch.setenv("UNIPERCEPTION_DWCONV_BACKEND", "no_such_backend")
    with pytest.raises(ConfigurationError, match="UNIPERCEPTION_DWCONV_BACKEND"):
        depthwise_conv2d(x, weight)
    with pytest.raises(ConfigurationError, match="unknown depthwise backend 'cudnn'"):
        with use_backend("cudnn"):
            pass


def test_triton_without_gpu_or_interpreter_falls_back_with_one_warning(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from backbones.ops.depthwise import clear_decisions

    clear_decisions()
    x, weight = torch.randn(1, 2, 9, 9), torch.randn(2, 1, 7, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = depthwise_conv2d(x, weight, backend="triton")
        second = depthwise_conv2d(x, weight, backend="triton")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "need a CUDA tensor" in messages[0]
    assert torch.equal(first, F.conv2d(x, weight, padding=3, groups=2)) and torch.equal(first, second)
    clear_decisions()


def test_a_failing_triton_kernel_falls_back_with_one_warning(monkeypatch):
    import backbones.ops.triton_depthwise as kernels
    from backbones.ops.depthwise import _BROKEN, clear_decisions

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")  # what a Triton compilation error looks like

    monkeypatch.setattr(kernels, "triton_depthwise_conv2d", broken)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    clear_decisions()
    x, weight = torch.randn(1, 2, 9, 9, device=DEVICE), torch.randn(2, 1, 9, 9, device=DEVICE)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [depthwise_conv2d(x, weight, backend="triton") for _ in range(3)]
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "PassManager::run failed" in messages[0]
        for y in results:
            assert torch.allclose(y, F.conv2d(x, weight, padding=4, groups=2))
    finally:
        _BROKEN.clear()
        clear_decisions()


def test_measured_policy_drives_auto(tmp_path, monkeypatch):
    entry = dict(device="cpu", dtype="float32", layout="nchw", batch=16, channels=160, height=28, width=28)
    policy = {"entries": [
        dict(entry, mode="inference", kernel_size=13, best="torch_channels_last"),
        dict(entry, mode="training", kernel_size=13, best="direct_fft_weight_grad"),
        dict(entry, mode="inference", kernel_size=3, best="torch"),
        dict(entry, mode="training", kernel_size=31, best="fft"),
        dict(entry, mode="inference", kernel_size=31, best="fft"),
    ]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    monkeypatch.setenv("UNIPERCEPTION_DWCONV_POLICY", str(path))
    monkeypatch.delenv("UNIPERCEPTION_DWCONV_BACKEND", raising=False)
    reload_policy()
    try:
        x, w13 = torch.randn(8, 160, 28, 28), torch.randn(160, 1, 13, 13)
        with torch.no_grad():
            assert select_backend(x, w13) == "torch_channels_last"
            assert select_backend(x, torch.randn(160, 1, 3, 3)) == "torch"
        assert select_backend(x, w13.requires_grad_()) == "direct_fft_weight_grad"  # training: nearest K 13
        assert select_backend(x, torch.randn(160, 1, 29, 29, requires_grad=True)) == "fft"  # nearest K 31
        # no entries for this device type: PyTorch
        assert select_backend(x.to(torch.float64).contiguous(memory_format=torch.channels_last), w13) == "torch"
        # under tracing for export only PyTorch's own backends run
        w31 = torch.randn(160, 1, 31, 31)
        with torch.no_grad():
            assert select_backend(x, w31) == "fft"
            traced = torch.jit.trace(lambda t: depthwise_conv2d(t, w31), (x[:1],))
        graph = str(traced.graph)
        assert "aten::_convolution" in graph and "fft" not in graph
    finally:
        monkeypatch.delenv("UNIPERCEPTION_DWCONV_POLICY")
        reload_policy()


def test_cpu_entries_of_the_running_instruction_set_come_first():
    from backbones.ops.policy import DispatchPolicy, cpu_isa

    shape = dict(device="cpu", dtype="float32", mode="inference", layout="channels_last", channels=320, height=14,
                 width=14, kernel_size=13)
    entries = [dict(shape, batch=16, isa="AVX512", best="cpu_direct"),
               dict(shape, batch=64, isa="AVX2", best="torch"),  # farther in batch, but measured on AVX2
               dict(shape, device="cuda", batch=16, best="triton")]
    args = ("float32", "inference", "channels_last", 16, 320, 14, 14, 13)
    assert DispatchPolicy(entries, isa="AVX2").choose("cpu", *args) == "torch"
    assert DispatchPolicy(entries, isa="AVX512").choose("cpu", *args) == "cpu_direct"
    # an instruction set nothing was measured with: the nearest entry of any
    assert DispatchPolicy(entries, isa="SVE256").choose("cpu", *args) == "cpu_direct"
    # the field is per CPU only, and a layout this CPU's entries do not cover falls back to the others'
    assert DispatchPolicy(entries, isa="AVX2").choose("cuda", *args) == "triton"
    other_layout = dict(shape, layout="nchw", batch=16, isa="AVX512", best="torch_channels_last")
    assert DispatchPolicy(entries + [other_layout], isa="AVX2").choose(
        "cpu", "float32", "inference", "nchw", 16, 320, 14, 14, 13) == "torch_channels_last"
    # entries from before the field existed count for every instruction set
    untagged = dict(shape, batch=16, best="fft")
    assert DispatchPolicy([untagged], isa="AVX2").choose("cpu", *args) == "fft"
    assert DispatchPolicy(entries).isa == cpu_isa() and cpu_isa() == str(torch.backends.cpu.get_cpu_capability())
    with pytest.warns(RuntimeWarning, match="1 malformed"):
        assert len(DispatchPolicy([dict(untagged, isa=2)])) == 0


def test_an_unreadable_policy_warns_and_uses_torch(tmp_path, monkeypatch):
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    monkeypatch.setenv("UNIPERCEPTION_DWCONV_POLICY", str(path))
    try:
        with pytest.warns(RuntimeWarning, match="policy .* is unreadable"):
            reload_policy()
        assert select_backend(torch.randn(1, 2, 8, 8), torch.randn(2, 1, 5, 5)) == "torch"
    finally:
        monkeypatch.delenv("UNIPERCEPTION_DWCONV_POLICY")
        reload_policy()


def test_shipped_policy_was_measured_on_this_kind_of_machine():
    from backbones.ops.policy import default_policy_path, load_policy

    policy = load_policy(default_policy_path())
    assert len(policy) > 0
    assert {e["device"] for e in policy.entries} >= {"cpu"}
    assert all(e.get("isa") in ("AVX512", "AVX2") for e in policy.entries if e["device"] == "cpu")
    for entry in policy.entries:
        times = entry["times_ms"]
        assert entry["best"] in available_backends() and entry["best"] in times
        # another backend is chosen only where it beat plain torch by at least 20% in the measurement
        assert entry["best"] == "torch" or times[entry["best"]] < 0.8 * times["torch"]
        assert times[entry["best"]] <= min(times.values()) / 0.8


# --------------------------------------------------------------------------------------------------------------------
# The whole backbone with each backend


def tiny_backbone():
    model = UniRepLKNet(in_chans=2, num_classes=5, depths=(1, 1, 1, 1), dims=(4, 8, 8, 8),
                        kernel_sizes=(3, 7, 13, 17)).to(DEVICE)
    return randomise_statistics(model)


def backbone_outputs_and_gradients(model, backend, x, target):
    model.zero_grad()
    with use_backend(backend):
        logits = model(x)
        F.cross_entropy(logits, target).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_backbone_backends(deploy, backends):
    model = tiny_backbone()
    if deploy:
        model.eval().reparameterize()
    model.eval()  # fixed BatchNorm statistics so the runs compare like with like
    x = torch.randn(2, 2, 40, 36, device=DEVICE)
    target = torch.tensor([1, 4], device=DEVICE)
    expected_logits, expected_grads = backbone_outputs_and_gradients(model, "torch", x, target)
    for backend in backends:
        logits, grads = backbone_outputs_and_gradients(model, backend, x, target)
        assert relative_error(logits, expected_logits) <= 1e-5, backend
        for name, grad in expected_grads.items():
            assert relative_error(grads[name], grad) <= 1e-4, f"{backend}: {name}"


@pytest.mark.parametrize("deploy", [False, True])
def test_backbone_gives_the_same_outputs_and_gradients_with_each_backend(deploy):
    check_backbone_backends(deploy, ["torch_channels_last", "fft", "direct_fft_weight_grad", "cpu_direct"])


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("deploy", [False, True])
def test_backbone_gives_the_same_outputs_and_gradients_with_triton(deploy):
    check_backbone_backends(deploy, ["triton"])


def test_dilated_branches_on_our_cpu_kernels_follow_autocast_like_the_module_path():
    from backbones.unireplknet import DilatedReparamBlock

    require_cpu_direct()
    block = randomise_statistics(DilatedReparamBlock(16, 13)).eval()
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    outputs = {}
    for backend in ("torch", "cpu_direct"):
        with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
            outputs[backend] = block(x)
    assert outputs["cpu_direct"].dtype == outputs["torch"].dtype
    assert relative_error(outputs["cpu_direct"].float(), outputs["torch"].float()) < 3e-2


def test_decisions_follow_a_changed_policy_file_and_malformed_entries_are_skipped(tmp_path, monkeypatch):
    x, w = torch.randn(2, 16, 20, 20), torch.randn(16, 1, 13, 13)
    entry = dict(device="cpu", dtype="float32", mode="inference", layout="nchw", batch=2, channels=16, height=20,
                 width=20, kernel_size=13)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"entries": [dict(entry, best="fft")]}))
    second.write_text(json.dumps({"entries": [dict(entry, best="torch_channels_last"), {"device": "cpu"},
                                              dict(entry, batch=0, best="fft")]}))
    monkeypatch.delenv("UNIPERCEPTION_DWCONV_BACKEND", raising=False)
    try:
        with torch.no_grad():
            monkeypatch.setenv("UNIPERCEPTION_DWCONV_POLICY", str(first))
            assert select_backend(x, w) == "fft"
            monkeypatch.setenv("UNIPERCEPTION_DWCONV_POLICY", str(second))
            with pytest.warns(RuntimeWarning, match="2 malformed entries ignored"):
                assert select_backend(x, w) == "torch_channels_last"
            assert depthwise_conv2d(x, w).shape == x.shape
    finally:
        monkeypatch.delenv("UNIPERCEPTION_DWCONV_POLICY")
        reload_policy()


def test_autocast_decides_and_computes_in_the_autocast_dtype():
    x, w = torch.randn(1, 3, 12, 12), torch.randn(3, 1, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, w, padding=3, groups=3)
        for backend in ("torch", "fft", "direct_fft_weight_grad"):
            y = depthwise_conv2d(x, w, backend=backend)
            assert y.dtype == expected.dtype == torch.bfloat16, backend
            assert torch.allclose(y.float(), expected.float(), rtol=3e-2, atol=3e-2), backend
        # float64 is left alone by autocast, as F.conv2d does
        assert depthwise_conv2d(x.double(), w.double(), backend="fft").dtype == torch.float64


def test_autocast_with_an_input_already_in_bfloat16_and_a_float32_weight():
    """Inside a network under autocast, the layer before hands over a bfloat16 input while the layer's own weight
    and bias stay float32: every backend must cast them, as F.conv2d does (forward and backward)."""
    x = torch.randn(2, 3, 12, 12).bfloat16().requires_grad_(True)
    w, b = torch.randn(3, 1, 7, 7, requires_grad=True), torch.randn(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, w, b, padding=3, groups=3)
        for backend in ("torch", "torch_channels_last", "fft", "direct_fft_weight_grad"):
            y = depthwise_conv2d(x, w, b, backend=backend)
            assert y.dtype == torch.bfloat16, backend
            assert torch.allclose(y.float(), expected.float(), rtol=3e-2, atol=3e-2), backend
            y.float().sum().backward()
            assert w.grad is not None and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32, backend
            w.grad = b.grad = x.grad = None


@pytest.mark.parametrize("weight_shape, message", [((3, 1, 4, 4), "odd K"), ((2, 1, 3, 3), r"weight \(3, 1, K, K\)"),
                                                   ((3, 3, 3), "weight")])
def test_the_functional_op_refuses_bad_weights(weight_shape, message):
    from backbones import InputShapeError

    with pytest.raises(InputShapeError, match=message):
        depthwise_conv2d(torch.randn(1, 3, 9, 7), torch.randn(*weight_shape), backend="fft")
