"""The CPU fast paths (in-place GELU/GRN, fused oneDNN Linear+GELU, GRN's sum-of-squares norm, channels-last, the
allocator setting) against the reference path, and the one call that applies them."""

import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from conftest import randomise_statistics, relative_error

import backbones
from backbones.runtime import fast_ops_enabled, reference_ops
from backbones.unireplknet import GELU, GRNwithNHWC, UniRepLKNetBlock, _spatial_l2_norm

FLOAT32_TOLERANCE = 1e-5


def _model(name="unireplknet_a", seed=0, form="train"):
    """A with non-trivial statistics, in eval mode, in its train or deploy form."""
    model = randomise_statistics(timm.create_model(name, num_classes=10).eval(), seed=seed)
    return model.reparameterize() if form == "deploy" else model


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("size", [64, 160])  # 160 px: a 40x40 first stage takes GRN's vector_norm branch
def test_fast_inference_matches_reference_ops(form, size):
    model = _model(form=form)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        with reference_ops():
            assert not fast_ops_enabled()
            expected = model(x)
        assert fast_ops_enabled()
        fast = model(x)
        channels_last = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(fast, expected) < FLOAT32_TOLERANCE
    assert relative_error(channels_last, expected) < FLOAT32_TOLERANCE
    assert not torch.equal(fast, torch.zeros_like(fast))


def test_fused_path_is_what_inference_runs_and_is_skipped_for_hooks():
    block = randomise_statistics(UniRepLKNetBlock(16, 7).eval())
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert block._fuse_linears(block.dwconv(x)) == backbones.unireplknet._MKLDNN_LINEAR
        seen = []
        handle = block.act[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        with_hook = block(x)
        handle.remove()
        without_hook = block(x)
        with reference_ops():
            expected = block(x)
    assert seen == [torch.Size([2, 9, 9, 64])], "a hooked FFN must run module by module"
    # a Linear replaced by another module type (a wrapper, a quantised layer) is called, not bypassed
    calls = []

    class CountingLinear(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    counting = CountingLinear(16, 64)
    counting.load_state_dict(block.pwconv1[1].state_dict())
    block.pwconv1[1] = counting
    with torch.no_grad():
        wrapped = block(x)
    assert calls == [1] and relative_error(wrapped, expected) < FLOAT32_TOLERANCE
    assert relative_error(with_hook, expected) < FLOAT32_TOLERANCE

    class Wrapped(torch.nn.Module):  # no .weight of its own, as a quantisation or LoRA wrapper may be
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    block.pwconv2[0] = Wrapped(block.pwconv2[0])
    with torch.no_grad():
        assert not block._fuse_linears(block.dwconv(x))
        assert relative_error(block(x), expected) < FLOAT32_TOLERANCE
    assert relative_error(without_hook, expected) < FLOAT32_TOLERANCE


def test_se_scales_the_depthwise_output_in_place_only_when_nothing_else_holds_it():
    block = randomise_statistics(UniRepLKNetBlock(16, 7).eval())
    block.reparameterize()
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with reference_ops():
            expected = block(x)
        assert relative_error(block(x), expected) < FLOAT32_TOLERANCE
        kept = []
        # a hook on the large kernel inside the reparameterised branch block, or on the block itself
        for module in (block.dwconv.lk_origin, block.dwconv):
            handle = module.register_forward_hook(lambda module, args, out: kept.append((out, out.clone())))
            assert relative_error(block(x), expected) < FLOAT32_TOLERANCE
            handle.remove()
    assert len(kept) == 2
    for out, copy in kept:
        assert torch.equal(out, copy), "a tensor a hook kept was overwritten"


def test_training_gradients_match_reference_ops():
    model = _model().train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for reference in (True, False):
        model.zero_grad()
        torch.manual_seed(1)
        if reference:
            with reference_ops():
                model(x).square().sum().backward()
        else:
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    # some gradients are zero up to rounding (a bias before a training-mode BatchNorm): judge each against the largest
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name in grads[0]:
        assert (grads[1][name] - grads[0][name]).abs().max().item() < 1e-5 * scale, name


def test_inplace_layers_only_overwrite_without_autograd():
    gelu, grn = GELU(inplace=True), GRNwithNHWC(8, inplace=True)
    with torch.no_grad():
        grn.gamma.normal_()
        grn.beta.normal_()
    x = torch.randn(2, 5, 5, 8)
    kept = x.clone()
    # autograd on: inputs untouched
    assert torch.equal(gelu(x), torch.nn.functional.gelu(kept)) and torch.equal(x, kept)
    grn(x)
    assert torch.equal(x, kept)
    with torch.no_grad():
        expected = GRNwithNHWC(8)
        expected.load_state_dict(grn.state_dict())
        want = expected(torch.nn.functional.gelu(kept))
        y = gelu(x)
        assert y.data_ptr() == x.data_ptr() and torch.equal(x, torch.nn.functional.gelu(kept))
        out = grn(y)
        assert out.data_ptr() == x.data_ptr()
        assert relative_error(out, want) < FLOAT32_TOLERANCE
        # inside reference_ops nothing is overwritten
        z = kept.clone()
        with reference_ops():
            gelu(z)
        assert torch.equal(z, kept)


@pytest.mark.parametrize("size, chunk", [(7, None), (40, None), (9, 1), (9, 2 * 81 * 6)])
def test_grn_norm_matches_vector_norm_with_a_dead_channel(size, chunk, monkeypatch):
    if chunk is not None:  # batch chunks of one and of two samples
        monkeypatch.setattr(backbones.unireplknet, "_SQUARE_SUM_CHUNK", chunk)
    x = torch.randn(3, size, size, 6, dtype=torch.float64)
    x[1, :, :, 2] = 0.0  # an all-zero channel: the norm's slope is infinite there
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(3, 1, 1, 6, dtype=torch.float64)
    norm = _spatial_l2_norm(ours)
    (norm * weights).sum().backward()
    reference = torch.linalg.vector_norm(theirs, ord=2, dim=(1, 2), keepdim=True)
    (reference * weights).sum().backward()
    assert norm.shape == (3, 1, 1, 6)
    assert relative_error(norm, reference) < 1e-12
    assert torch.isfinite(ours.grad).all()
    assert relative_error(ours.grad, theirs.grad) < 1e-12


@pytest.mark.parametrize("size, channels", [(7, 6), (14, 64), (9, 100)])
def test_grn_norm_of_float32_maps_in_one_pass_matches_vector_norm(size, channels):
    # float32 CPU maps take our CPU kernels' one-pass sum of squares
    x = torch.randn(3, size, size, channels)
    x[1, :, :, 2] = 0.0
    ours, theirs = x.clone().requires_grad_(), x.double().requires_grad_()
    weights = torch.randn(3, 1, 1, channels)
    norm = _spatial_l2_norm(ours)
    (norm * weights).sum().backward()
    reference = torch.linalg.vector_norm(theirs, ord=2, dim=(1, 2), keepdim=True)
    (reference * weights.double()).sum().backward()
    assert norm.dtype == torch.float32 and norm.shape == (3, 1, 1, channels)
    assert relative_error(norm.double(), reference) < 1e-6
    assert torch.isfinite(ours.grad).all() and relative_error(ours.grad.double(), theirs.grad) < 1e-6


def test_grn_norm_of_an_empty_batch():
    assert _spatial_l2_norm(torch.randn(0, 5, 5, 4)).shape == (0, 1, 1, 4)


def test_grn_norm_of_half_precision_input_does_not_overflow():
    x = torch.full((1, 4, 4, 3), 300.0, dtype=torch.float16)  # 300^2 overflows float16
    norm = _spatial_l2_norm(x)
    assert norm.dtype == torch.float32 and torch.allclose(norm, torch.full_like(norm, 1200.0))


def test_optimize_for_inference_is_one_call_and_matches_the_train_form(monkeypatch):
    calls = []
    monkeypatch.setattr(backbones.runtime, "keep_freed_memory", lambda enable=True: calls.append(enable) or True)
    model = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), reference_ops():
        expected = model(x)
    fast = backbones.optimize_for_inference(model)
    assert fast is model and model.deploy and not model.training and calls == [True]
    assert model.stages[0][0].pwconv1[1].weight.is_contiguous()  # Linear weights are 2-D: unchanged
    assert model.downsample_layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    backbones.optimize_for_inference(model)  # idempotent: one input hook only
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        out = fast(x)  # an NCHW input is handed over channels-last
    assert relative_error(out, expected) < FLOAT32_TOLERANCE
    with pytest.raises(backbones.ConfigurationError, match="nn.Module"):
        backbones.optimize_for_inference(lambda t: t)


def test_cli_keeps_freed_memory_unless_told_not_to(monkeypatch, capsys):
    from uniperception import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda enable=True: calls.append(enable) or True)
    monkeypatch.delenv(cli.KEEP_MEMORY_ENV, raising=False)
    assert cli.main(["demo", "--list"]) == 0
    monkeypatch.setenv(cli.KEEP_MEMORY_ENV, "0")
    assert cli.main(["demo", "--list"]) == 0
    assert calls == [True]
    capsys.readouterr()


def test_keep_freed_memory_serves_large_blocks_from_the_reused_heap():
    """In a fresh process (the setting is process-wide), read from glibc's own accounting (``mallinfo2``): by default
    a 64 MiB tensor is a fresh mapping, returned on free; while freed memory is kept it comes from the heap and stays
    there, free for the next one; after ``keep_freed_memory(False)`` a new large block is a mapping again. Page faults
    of re-allocating drop too (counted loosely: huge pages vary them)."""
    script = textwrap.dedent(
        """
        import ctypes, resource, torch
        from backbones.runtime import keep_freed_memory, keeping_freed_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        MIB = 1 << 20

        def probe(mib=64):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            buffer = torch.empty(mib * MIB // 4)
            buffer.fill_(1.0)
            mapped = libc.mallinfo2().hblkhd // MIB
            del buffer
            free_in_heap = libc.mallinfo2().fordblks // MIB
            return mapped, free_in_heap, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        default = probe()
        assert keep_freed_memory(True) and keeping_freed_memory()
        probe()
        kept = probe()
        assert keep_freed_memory(False) and not keeping_freed_memory()
        restored = probe(256)  # larger than all the heap holds free: the free lists may still serve smaller ones
        print(*default, *kept, *restored)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    values = list(map(int, done.stdout.split()))
    default, kept, restored = values[0:3], values[3:6], values[6:9]
    assert default[0] >= 64 and default[1] < 64, f"by default the block is its own mapping: {default}"
    assert kept[0] < 64 and kept[1] >= 64, f"kept: the block comes from the heap and stays free there: {kept}"
    assert restored[0] >= 256, f"restored: a mapping again: {restored}"
    assert kept[2] <= default[2]


# bfloat16 inference: max |logit difference| / max |float32 logit| (measured 0.5-1.2% on A and T, 64 and 160 px)
BFLOAT16_TOLERANCE = 3e-2


@pytest.mark.parametrize("name, size", [("unireplknet_a", 64), ("unireplknet_a", 160), ("unireplknet_t", 64)])
def test_bfloat16_inference_is_within_its_tolerance_of_float32(name, size):
    model = _model(name)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    low = backbones.optimize_for_inference(model, dtype=torch.bfloat16, keep_memory=False)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    with torch.no_grad():
        fast = low(x)  # a float32 NCHW input is handed over as bfloat16, channels-last
        with reference_ops():
            reference = low(x)
    assert fast.dtype == torch.bfloat16 and torch.isfinite(fast).all()
    assert relative_error(fast.float(), expected) < BFLOAT16_TOLERANCE
    assert relative_error(reference.float(), expected) < BFLOAT16_TOLERANCE
    # the fused bfloat16 path and the straightforward ops differ by bfloat16 rounding only
    assert relative_error(fast.float(), reference.float()) < BFLOAT16_TOLERANCE


def test_fused_path_runs_in_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    block = randomise_statistics(UniRepLKNetBlock(16, 7).eval())
    block.reparameterize()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y = block.dwconv(x)
        assert block._fuse_linears(y) == backbones.unireplknet._MKLDNN_LINEAR
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not block._fuse_linears(y), "a float32 map under autocast: autocast casts each module's input"
            assert block._fuse_linears(y.bfloat16()) == (torch.bfloat16 in backbones.unireplknet._FUSED_DTYPES)
        with torch.autocast("cpu", dtype=torch.float16):
            assert not block._fuse_linears(y.half())
        assert not block._fuse_linears(y.bfloat16()), "float32 weights with a bfloat16 map take the module path"
        block.bfloat16()
        low = block.dwconv(x.bfloat16())
        assert block._fuse_linears(low) == (torch.bfloat16 in backbones.unireplknet._FUSED_DTYPES)
        assert (torch.bfloat16 in backbones.unireplknet._FUSED_DTYPES) == (
            backbones.unireplknet._MKLDNN_LINEAR and backbones.native_bfloat16())
        monkeypatch.setattr(backbones.unireplknet, "_FUSED_DTYPES", (torch.float32,))
        assert not block._fuse_linears(low)


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("size", [64, 160])
def test_fast_ops_under_bfloat16_autocast_match_the_module_path(form, size):
    model = _model(form=form)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with reference_ops():
                reference = model(x)
            fast = model(x)
            channels_last = model.to(memory_format=torch.channels_last)(
                x.contiguous(memory_format=torch.channels_last))
    for out in (fast, channels_last, reference):
        assert torch.isfinite(out).all() and relative_error(out.float(), expected) < BFLOAT16_TOLERANCE
    assert relative_error(fast.float(), reference.float()) < BFLOAT16_TOLERANCE
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast leaves the weights alone"


def test_grn_norm_of_bfloat16_input_is_summed_in_float32():
    x = torch.full((2, 64, 64, 3), 3.0, dtype=torch.bfloat16)  # 4096 squares of 9: a bfloat16 running sum stalls
    x[1, :, :, 2] = 0.0
    norm = _spatial_l2_norm(x)
    assert norm.dtype == torch.float32
    assert torch.allclose(norm[0], torch.full_like(norm[0], 192.0), rtol=4e-3)  # sqrt(4096 * 9), bfloat16 rounding
    assert norm[1, 0, 0, 2] == 0.0
    y = torch.randn(3, 20, 20, 8, dtype=torch.bfloat16)
    with reference_ops():
        expected = _spatial_l2_norm(y)
    assert torch.allclose(_spatial_l2_norm(y), expected, rtol=4e-3)


def test_optimize_for_inference_checks_its_dtype_and_warns_without_native_bfloat16(monkeypatch, caplog):
    with pytest.raises(backbones.ConfigurationError, match="dtype"):
        backbones.optimize_for_inference(_model(), dtype=torch.float16, keep_memory=False)
    monkeypatch.setattr(backbones.runtime, "native_bfloat16", lambda: False)
    model = _model()
    with caplog.at_level("WARNING", logger="backbones.runtime"):
        backbones.optimize_for_inference(model, dtype=torch.bfloat16, keep_memory=False)
    assert "no native bfloat16" in caplog.text
    backbones.optimize_for_inference(model, dtype=torch.bfloat16, keep_memory=False)
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():  # a bfloat16 input passes through unchanged, a float64 one is cast
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.bfloat16


def test_optimize_for_inference_in_bfloat16_serves_a_uniperceiver():
    from uniperception import UniPerceiver

    model = UniPerceiver("time_series", backbone="unireplknet_a", num_classes=3, length=32, num_variables=2,
                         min_d_model=16)
    randomise_statistics(model)
    series = torch.randn(4, 32, 2 + 6)  # preprocessed: 2 variables and 6 time features
    with torch.no_grad():
        expected = model.eval()(series)
    backbones.optimize_for_inference(model, dtype=torch.bfloat16, keep_memory=False)
    with torch.no_grad():
        low = model(series)  # a 3-D float32 batch: cast to bfloat16, layout left as it is
    assert low.dtype == torch.bfloat16
    assert relative_error(low.float(), expected) < BFLOAT16_TOLERANCE
