"""UniRepLKNet as a timm backbone, end to end: build, load weights, re-parameterise, extract features, export.

Run it as it is (random weights), or point it at an official checkpoint::

    python examples/backbone.py
    python examples/backbone.py --checkpoint ~/Downloads/unireplknet_a_in1k_224_acc77.03.pth

Every step prints what it did; nothing is downloaded.
"""

import argparse
import tempfile
from pathlib import Path

import timm
import torch

import backbones


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unireplknet_a")
    parser.add_argument("--checkpoint", default=None, help="an official .pth file (optional)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--onnx", default=None, help="where to write the ONNX file (default: a temporary folder)")
    args = parser.parse_args(argv)

    # 1. a spectrogram-style model: one input channel, 35 classes (Speech Commands)
    model = timm.create_model(args.model, in_chans=1, num_classes=35)
    if args.checkpoint:
        # the stem is adapted from 3 channels to 1 and the 1000-class head is dropped
        print(backbones.load_checkpoint(model, args.checkpoint))
    model.eval()
    x = torch.randn(2, 1, args.image_size, args.image_size)
    with torch.inference_mode():
        logits = model(x)
    print(f"train form: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, logits {tuple(logits.shape)}")

    # 2. the deploy form: same function, fewer parameters, faster
    model.reparameterize()
    with torch.inference_mode():
        deployed = model(x)
    print(f"deploy form: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"max |difference| {(deployed - logits).abs().max().item():.2e}")

    # 3. multi-scale features for dense prediction (the official features mode: normalised stage outputs)
    features = timm.create_model(args.model, features_only=True, out_indices=(1, 2, 3))
    with torch.inference_mode():
        maps = features(torch.randn(1, 3, args.image_size, args.image_size))
    print("features:", ", ".join(str(tuple(m.shape)) for m in maps))

    # 4. ONNX export of the deploy form
    out_dir = Path(args.onnx).parent if args.onnx else Path(tempfile.mkdtemp())
    onnx_path = Path(args.onnx) if args.onnx else out_dir / f"{args.model}.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=True, input_names=["spectrogram"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    print(f"ONNX: {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
