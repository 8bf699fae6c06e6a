"""Inputs the backbone must take (any channels, odd sizes, batch 1, bf16, channels-last) and those it must refuse."""

import pytest
import timm
import torch

from backbones import InputShapeError
from conftest import randomise_statistics, relative_error


@pytest.mark.parametrize("in_chans", [1, 2, 4, 7])
def test_any_number_of_input_channels(in_chans):
    model = timm.create_model("unireplknet_a", in_chans=in_chans, num_classes=4).eval()
    assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("height, width", [(32, 32), (33, 47), (65, 97), (128, 40), (224, 224)])
def test_non_square_and_odd_sizes(height, width):
    model = timm.create_model("unireplknet_a").eval()
    x = torch.randn(1, 3, height, width)
    fmap = model.forward_features(x)
    assert fmap.shape == (1, 320, -(-height // 32), -(-width // 32))
    assert torch.isfinite(fmap).all()


def test_batch_of_one_trains():
    model = timm.create_model("unireplknet_a", num_classes=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(1, 3, 64, 64)), torch.tensor([1]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batch_of_one_at_the_minimum_size_cannot_train_and_says_why():
    model = timm.create_model("unireplknet_a").train()
    with pytest.raises(InputShapeError, match="batch of at least 2"):
        model(torch.randn(1, 3, 32, 32))
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


@pytest.mark.parametrize("deploy", [False, True])
def test_bf16_autocast_is_finite_and_close_to_float32(deploy):
    model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=0)).eval()
    if deploy:
        model.reparameterize()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(x)
    assert torch.isfinite(actual).all()
    cosine = torch.nn.functional.cosine_similarity(actual.float(), expected, dim=1)
    assert cosine.min() > 0.99


def test_grn_does_not_overflow_in_half_precision():
    from backbones.unireplknet import GRNwithNHWC

    grn = GRNwithNHWC(8).to(torch.float16)
    with torch.no_grad():
        grn.gamma.fill_(0.5)
    x = torch.full((1, 64, 64, 8), 200.0, dtype=torch.float16)  # sum of squares 1.6e8 > fp16 max
    out = grn(x)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.full_like(out.float(), 200.0 * 1.5), rtol=1e-3)


def test_channels_last_input_gives_the_same_output():
    model = randomise_statistics(timm.create_model("unireplknet_a")).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        assert relative_error(model(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
        model = model.to(memory_format=torch.channels_last)
        assert relative_error(model(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5
        model.reparameterize()
        assert relative_error(model(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-5


def test_wrong_channel_count_is_a_clear_error():
    model = timm.create_model("unireplknet_a", in_chans=1)
    with pytest.raises(InputShapeError) as info:
        model(torch.randn(2, 3, 64, 64))
    assert "built for 1 input channel(s) but got 3" in str(info.value)


@pytest.mark.parametrize("shape", [(2, 3, 31, 64), (2, 3, 64, 16), (1, 3, 8, 8)])
def test_too_small_inputs_are_a_clear_error(shape):
    model = timm.create_model("unireplknet_a").eval()
    with pytest.raises(InputShapeError, match="at least 32x32"):
        model(torch.randn(*shape))


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64)])
def test_wrong_rank_is_a_clear_error(shape):
    model = timm.create_model("unireplknet_a").eval()
    with pytest.raises(InputShapeError, match="4-D input"):
        model(torch.randn(*shape))
    with pytest.raises(InputShapeError):
        model.forward_intermediates(torch.randn(*shape))


def test_integer_images_are_refused_with_a_hint():
    model = timm.create_model("unireplknet_a").eval()
    with pytest.raises(InputShapeError, match="floating-point input, got torch.uint8"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
