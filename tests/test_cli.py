"""The command line: `uniperception info` builds, converts, checks and measures a backbone."""

import json
import subprocess
import sys

import torch

from uniperception.cli import main
from conftest import state_dict_from_reference


def test_info_reports_both_forms_as_json(capsys):
    code = main(["info", "--model", "unireplknet_a", "--image-size", "64", "--batch-size", "2", "--min-time", "0",
                 "--in-chans", "1", "--num-classes", "35", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    train, deploy = result["forms"]
    assert train["form"] == "train form (eval)" and deploy["form"] == "deploy form"
    assert train["parameters"] > deploy["parameters"]
    assert train["images_per_second"] > 0 and deploy["images_per_second"] > 0
    assert result["reparam_relative_error"] <= 1e-5


def test_info_with_an_official_checkpoint_and_a_kernel_plan(tmp_path, capsys):
    path = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"
    torch.save({"model": state_dict_from_reference("a", "train")}, path)
    code = main(["info", "--checkpoint", str(path), "--image-size", "64", "--batch-size", "2", "--min-time", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"loaded 626 tensors from {path}" in out
    assert "deploy form speed-up" in out
    code = main(["info", "--kernel-sizes", "3,13,13,11", "--image-size", "64", "--batch-size", "2",
                 "--min-time", "0", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["forms"][1]["parameters"] > 0


def test_info_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["info", "--model", "unireplknet_zz"]) == 2
    assert "unknown model 'unireplknet_zz'" in capsys.readouterr().err
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x00" * 100)
    assert main(["info", "--checkpoint", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.pth: cannot read checkpoint" in err and "Traceback" not in err
    assert main(["info", "--kernel-sizes", "3,13,21,13"]) == 2
    assert "unsupported kernel sizes [21]" in capsys.readouterr().err


def test_module_entry_point_prints_help():
    done = subprocess.run([sys.executable, "-m", "uniperception", "info", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--checkpoint" in done.stdout


def test_backbone_example_runs(tmp_path, capsys):
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "backbone.py"
    namespace = runpy.run_path(str(example))
    path = tmp_path / "official.pth"
    torch.save(state_dict_from_reference("a", "train"), path)
    assert namespace["main"](["--checkpoint", str(path), "--image-size", "64", "--onnx", str(tmp_path / "a.onnx")]) == 0
    out = capsys.readouterr().out
    assert "downsample_layers.0.0.weight: 3 -> 1 input channels" in out
    assert "train form: 4.34M parameters" in out and "deploy form: 4.13M parameters" in out
    assert "features: (1, 80, 8, 8), (1, 160, 4, 4), (1, 320, 2, 2)" in out
    assert (tmp_path / "a.onnx").stat().st_size > 100_000


def test_info_refuses_bad_options_with_one_line(capsys):
    assert main(["info", "--kernel-sizes", "3,13,x"]) == 2
    assert "one integer per stage" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["info", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["info", "--device", "tpu-9"]) == 2
    assert "--device must be" in capsys.readouterr().err
