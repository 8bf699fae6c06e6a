"""The deploy form leaves PyTorch: ONNX (run by onnxruntime) and torch.compile."""

import numpy as np
import pytest
import timm
import torch

from conftest import randomise_statistics, relative_error


def deploy_model(num_classes=10):
    model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=num_classes)).eval()
    return model.reparameterize()


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = deploy_model()
    path = tmp_path / "unireplknet_a.onnx"
    example = torch.randn(2, 3, 64, 96)
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, input_names=["image"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # another batch size than the one exported with
        x = torch.randn(batch, 3, 64, 96)
        (logits,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = deploy_model()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= 1e-5


def test_torch_compile_traces_the_deploy_form_in_one_graph():
    """The fast path's run-time checks (context variables, kept-weight checks) stay out of a traced graph: a graph
    break per layer made every block its own graph and hit dynamo's recompile limit at a few input shapes."""
    model = deploy_model()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.slow
def test_torch_compile_traces_a_training_step_of_the_train_form_in_one_graph():
    model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=10)).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
