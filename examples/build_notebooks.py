"""Write examples/<modality>.ipynb, one notebook per modality, and examples/multimodal.ipynb from the cells below.

    python examples/build_notebooks.py            # write the five notebooks (without outputs)
    python examples/build_notebooks.py --execute  # and run them, keeping the outputs

Every notebook runs offline on a built-in dataset: it opens raw files, shows the map the backbone sees, trains
UniRepLKNet-A, evaluates it, answers for a file, re-parameterises it and exports ONNX. With
``UNIPERCEPTION_NOTEBOOK_QUICK=1`` in the environment (as CI runs them) they train one epoch on a subset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os, warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import Subset

from uniperception import UniPerceiver, datasets
from uniperception.demo import DEMOS
from uniperception.engine import TrainConfig, Trainer
from uniperception.metrics import plot_confusion_matrix

warnings.simplefilter("ignore", RuntimeWarning)
QUICK = os.environ.get("UNIPERCEPTION_NOTEBOOK_QUICK") == "1"  # CI: one epoch on a subset
OUTPUT = Path(os.environ.get("UNIPERCEPTION_NOTEBOOK_OUTPUT", "runs/notebooks")) / "{name}"
torch.manual_seed(0)
settings = DEMOS["{name}"]
print(settings)'''

TRAIN = '''\
model = UniPerceiver("{modality}", class_names=data.class_names, **settings.adapter)
adapter = model.adapters["{modality}"]
train = data.dataset("train", adapter, train=True, cache=True)
val = data.dataset("val", adapter, cache=True)
test = data.dataset("test", adapter, cache=True)
recipe = {{k: v for k, v in settings.train.items() if k != "select"}}
if QUICK:
    train, val, recipe["epochs"] = Subset(train, range(0, len(train), max(1, len(train) // 48))), \\
        Subset(val, range(0, len(val), max(1, len(val) // 16))), 1
config = TrainConfig(output=str(OUTPUT), progress=False, **recipe)
history = Trainer(model, train, val, config).fit()
print(f"{{len(history)}} epoch(s), last: {{history[-1]}}")'''

CURVES = '''\
from IPython.display import Image, display
display(Image(str(OUTPUT / "curves.png")))'''

EVALUATE = '''\
metrics = Trainer(model, test, None, config).evaluate(test)
print(f"test top-1 {{metrics['top1']:.3f}}, macro accuracy {{metrics['macro_accuracy']:.3f}} on {{metrics['count']}} "
      f"samples (the demo's floor: {{settings.floor}})")
plot_confusion_matrix(metrics["confusion_matrix"], data.class_names, OUTPUT / "test_confusion.png")
display(Image(str(OUTPUT / "test_confusion.png")))'''

PREDICT = '''\
example = data.files("test")[0]
answer = model.predict(str(example))
print(f"{{example.name}} (a {{example.parent.name!r}}): {{answer['class_name']}} with probability "
      f"{{answer['probabilities'].max():.3f}}")'''

DEPLOY = '''\
model.eval()
batch = adapter.collate([adapter.prepare(str(p)) for p in data.files("test")[:4]])
with torch.no_grad():
    before = model(batch)
    model.reparameterize()  # merge the dilated branches and BatchNorms into single large kernels
    after = model(batch)
print(f"deploy form: max |difference| {{(after - before).abs().max():.2e}} over logits of size "
      f"{{before.abs().max():.1f}}")
saved = model.save_pretrained(OUTPUT / "deploy")
print("saved to", saved, sorted(p.name for p in saved.iterdir()))'''

EXPORT = '''\
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
    print("pip install onnx onnxscript onnxruntime to export and run ONNX")
if onnxruntime is not None:
    path = model.export_onnx(OUTPUT / "{name}.onnx", batch=batch)
    session = onnxruntime.InferenceSession(str(path))
    (onnx_logits,) = session.run(None, {{"batch": batch.numpy()}})
    print(f"{{path.name}}: {{path.stat().st_size / 1e6:.1f}} MB, max |ONNX - PyTorch| "
          f"{{np.abs(onnx_logits - after.numpy()).max():.2e}}")'''


NOTEBOOKS = {
    "image": dict(name="digits", title="Images: handwritten digits", intro=(
        "scikit-learn's 1797 handwritten digits (8x8 pixels, 17 grey levels) become a built-in dataset of PNG files. "
        "The image adapter reads any common format, resizes to the model's input and normalises with ImageNet "
        "statistics; training adds timm's random resized crop."), look='''\
files = data.files("train")[::130][:8]
fig, axes = plt.subplots(1, len(files), figsize=(12, 2))
for axis, path in zip(axes, files):
    axis.imshow(plt.imread(path), cmap="gray"); axis.set_title(path.parent.name); axis.axis("off")''', show='''\
from modalities import create_adapter
adapter = create_adapter("image", **settings.adapter)
sample = adapter.prepare(str(files[0]))  # (3, 32, 32), ImageNet-normalised
std, mean = (torch.tensor(adapter.config[key])[:, None, None] for key in ("std", "mean"))
shown = sample * std + mean
plt.imshow(shown.permute(1, 2, 0).clamp(0, 1)); plt.title(f"what the backbone sees: {tuple(sample.shape)}")
plt.axis("off");'''),
    "audio": dict(name="spoken_commands", title="Audio: spoken command words", intro=(
        "Ten command words spoken by espeak-ng voices (English accents x voice variants, random speed and pitch) "
        "become 1 s WAV files; the test voices never speak in training. The audio adapter reads WAV/FLAC/OGG/MP3, "
        "resamples to 16 kHz and computes a Kaldi log-mel filterbank with torchaudio, fed as a 1-channel image "
        "(frequency x time)."), look='''\
import soundfile
files = data.files("train")[::200][:4]
fig, axes = plt.subplots(1, len(files), figsize=(14, 2))
for axis, path in zip(axes, files):
    wave, rate = soundfile.read(path)
    axis.plot(np.arange(len(wave)) / rate, wave, linewidth=0.5); axis.set_title(f"{path.parent.name} ({rate} Hz)")''',
        show='''\
from modalities import create_adapter
adapter = create_adapter("audio", **settings.adapter)
fig, axes = plt.subplots(1, len(files), figsize=(14, 3))
for axis, path in zip(axes, files):
    spectrogram = adapter.prepare(str(path))  # (1, mel bins, frames)
    axis.imshow(spectrogram[0], origin="lower", aspect="auto"); axis.set_title(path.parent.name)
axes[0].set_ylabel("mel bin"); axes[0].set_xlabel("10 ms frame");'''),
    "video": dict(name="moving_digits", title="Video: moving digits", intro=(
        "Handwritten digits move left, right, up or down, turn either way, or zoom in or out over 16 frames, written "
        "as H.264 MP4 files. Left and right (and up and down, zoom in and out) are each other played backwards, so "
        "only the frame order separates them. The video adapter decodes with PyAV, samples frames and lays them out "
        "as one image (the released memory reshape by default)."), look='''\
import av
path = sorted((data.folder("val") / "rotate_cw").iterdir())[0]
with av.open(str(path)) as container:
    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
fig, axes = plt.subplots(1, 8, figsize=(14, 2))
for axis, frame, index in zip(axes, frames[::2], range(0, 16, 2)):
    axis.imshow(frame); axis.set_title(f"frame {index}"); axis.axis("off")''', show='''\
from modalities import create_adapter
for layout in ("reshape", "grid"):
    adapter = create_adapter("video", **dict(settings.adapter, layout=layout))
    sample = adapter.prepare(str(path))
    plt.figure(figsize=(4, 4)); plt.imshow(sample[0], cmap="gray")
    plt.title(f"layout {layout!r}: {tuple(sample.shape)}"); plt.axis("off")'''),
    "point_cloud": dict(name="primitives", title="Point clouds: primitive shapes", intro=(
        "Surfaces of open3d's primitive meshes (box, sphere, cylinder, cone, torus and three platonic solids) with "
        "random proportions, pose and jitter, written as PLY point clouds. The adapter reads them with open3d, "
        "normalises into the unit sphere, keeps 1024 points by farthest-point sampling and projects them onto "
        "several views (here the parameter-free depth projection; the paper's learned p2p is the default)."),
        look='''\
import open3d as o3d
files = [sorted((data.folder("val") / shape).iterdir())[0] for shape in ("box", "cone", "torus", "icosahedron")]
fig = plt.figure(figsize=(14, 3.5))
for index, path in enumerate(files):
    points = np.asarray(o3d.io.read_point_cloud(str(path)).points)
    axis = fig.add_subplot(1, len(files), index + 1, projection="3d")
    axis.scatter(*points.T, s=1); axis.set_title(path.parent.name)''', show='''\
from modalities import create_adapter
adapter = create_adapter("point_cloud", **settings.adapter)
views, _ = adapter.encode(adapter.collate([adapter.prepare(str(files[0]))]))  # (views, channels, S, S)
fig, axes = plt.subplots(1, views.shape[0], figsize=(12, 3))
for index, axis in enumerate(axes):
    axis.imshow(views[index, 0].detach()); axis.set_title(f"view {index}"); axis.axis("off")'''),
    "time_series": dict(name="gunpoint", title="Time series: GunPoint", intro=(
        "The UCR GunPoint set that aeon ships: the hand's x-coordinate while an actor draws a gun or points a "
        "finger (150 steps). Every series is a CSV file; the time-series adapter normalises it per instance, "
        "embeds values and calendar features (Eq. 2 of the paper) and lays the embedded sequence out as a "
        "1-channel map. The same adapter forecasts (see the co2 and sunspots sets)."), look='''\
import pandas as pd
files = [sorted((data.folder("train") / label).iterdir())[0] for label in data.class_names]
for path in files:
    series = pd.read_csv(path)
    plt.plot(series["c0"], label=f"class {path.parent.name}")
plt.legend(); plt.xlabel("step");''', show='''\
from modalities import create_adapter
adapter = create_adapter("time_series", **settings.adapter)
maps, _ = adapter.encode(adapter.collate([adapter.prepare(str(files[0]))]))  # (1, 1, H, W)
plt.imshow(maps[0, 0].detach(), aspect="auto"); plt.colorbar()
plt.title(f"the embedded series laid out row by row: {tuple(maps.shape[1:])}");'''),
}


MULTIMODAL_SETUP = '''\
import os, warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display
from torch.utils.data import Subset

from uniperception import UniPerceiver, datasets
from uniperception.alignment import chance_recall_at_k, class_prototypes, prototype_accuracy, recall_at_k
from uniperception.demo import DEMOS
from uniperception.engine import TrainConfig, Trainer

warnings.simplefilter("ignore", RuntimeWarning)
QUICK = os.environ.get("UNIPERCEPTION_NOTEBOOK_QUICK") == "1"  # CI: one epoch on a subset
OUTPUT = Path(os.environ.get("UNIPERCEPTION_NOTEBOOK_OUTPUT", "runs/notebooks")) / "multimodal"
torch.manual_seed(0)'''

MULTIMODAL_DATA = '''\
SETS = {"image": "digits", "audio": "spoken_digits", "video": "digit_clips"}
data = {modality: datasets.load(name) for modality, name in SETS.items()}
for modality, built in data.items():
    print(f"{modality:6} {built.name:14} {built.counts}  classes {built.class_names}")
assert data["audio"].class_names == data["image"].class_names == data["video"].class_names'''

MULTIMODAL_LOOK = '''\
import av, soundfile
fig, axes = plt.subplots(3, 5, figsize=(14, 7))
for column, digit in enumerate(["0", "3", "5", "7", "9"]):
    image = sorted((data["image"].folder("test") / digit).iterdir())[0]
    axes[0, column].imshow(plt.imread(image), cmap="gray"); axes[0, column].set_title(f"image {digit}")
    clip = sorted((data["audio"].folder("test") / digit).iterdir())[0]
    wave, rate = soundfile.read(clip)
    axes[1, column].plot(np.arange(len(wave)) / rate, wave, linewidth=0.5); axes[1, column].set_title(f"audio {digit}")
    video = sorted((data["video"].folder("test") / digit).iterdir())[0]
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    axes[2, column].imshow(np.concatenate(frames[::5], axis=1)); axes[2, column].set_title(f"video {digit}, 4 frames")
for axis in axes[[0, 2]].ravel():
    axis.axis("off")'''

MULTIMODAL_MODEL = '''\
RECIPES = {"image": "digits", "audio": "spoken_commands", "video": "moving_digits"}  # each modality's demo settings
model = UniPerceiver(list(SETS), class_names={m: data[m].class_names for m in SETS},
                     adapters={m: DEMOS[RECIPES[m]].adapter for m in SETS})
shared = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone.") and ".convs." not in n)
own = {m: sum(p.numel() for n, p in model.named_parameters() if f".{m}." in n) for m in SETS}
print(f"shared backbone: {shared / 1e6:.2f}M parameters; per modality (adapter, stem, head): {own}")'''

MULTIMODAL_TRAIN = '''\
train = {m: data[m].dataset("train", model.adapters[m], train=True, cache=True) for m in SETS}
val = {m: data[m].dataset("val", model.adapters[m], cache=True) for m in SETS}
test = {m: data[m].dataset("test", model.adapters[m], cache=True) for m in SETS}
epochs = 6
if QUICK:
    train = {m: Subset(d, range(0, len(d), max(1, len(d) // 48))) for m, d in train.items()}
    val = {m: Subset(d, range(0, len(d), max(1, len(d) // 20))) for m, d in val.items()}
    test = {m: Subset(d, range(0, len(d), max(1, len(d) // 40))) for m, d in test.items()}
    epochs = 1
config = TrainConfig(output=str(OUTPUT), progress=False, epochs=epochs, batch_size=32, lr=2e-3, warmup_epochs=0.5,
                     label_smoothing=0.1, schedule="proportional", align=1.0, align_to="image", temperature=0.1)
trainer = Trainer(model, train, val, config)
history = trainer.fit()
print({k: round(v, 3) for k, v in history[-1].items() if isinstance(v, float)})
display(Image(str(OUTPUT / "curves.png")))'''

MULTIMODAL_EVALUATE = '''\
for m in SETS:
    print(f"{m:6} test top-1 {trainer.evaluate(test[m], modality=m)['top1']:.3f}")
vectors = {m: trainer.embeddings(test[m], m) for m in SETS}
gallery, gallery_labels = vectors["image"]
prototypes = class_prototypes(gallery, gallery_labels, num_classes=10)
for m in ("audio", "video"):
    queries, labels = vectors[m]
    found = recall_at_k(queries, gallery, labels, gallery_labels)
    chance = chance_recall_at_k(labels, gallery_labels)
    print(f"{m} -> image: recall@1 {found['recall@1']:.3f} (chance {chance['recall@1']:.3f}), "
          f"recall@5 {found['recall@5']:.3f} (chance {chance['recall@5']:.3f}); zero-shot by image prototypes "
          f"{prototype_accuracy(prototypes, queries, labels):.3f} (chance 0.100)")'''

MULTIMODAL_PICTURE = '''\
everything = torch.cat([torch.nn.functional.normalize(vectors[m][0], dim=1) for m in SETS])
_, _, directions = torch.pca_lowrank(everything - everything.mean(0), q=2)
plt.figure(figsize=(8, 7))
for m, marker in zip(SETS, ("o", "^", "s")):
    points = (torch.nn.functional.normalize(vectors[m][0], dim=1) - everything.mean(0)) @ directions
    scatter = plt.scatter(points[:, 0], points[:, 1], c=vectors[m][1], cmap="tab10", vmin=0, vmax=9, marker=marker,
                          s=18, alpha=0.7, label=m)
plt.colorbar(scatter, label="digit"); plt.legend(title="modality")
plt.title("test embeddings of all three modalities, first two principal components");'''

MULTIMODAL_MIXED = '''\
sources = [sorted((data[m].folder("test") / digit).iterdir())[0] for digit in ("2", "8") for m in SETS]
embedded = torch.nn.functional.normalize(model.embed([str(s) for s in sources]), dim=1)  # sorted by suffix
names = [f"{s.parent.name} {s.suffix[1:]}" for s in sources]
similarity = embedded @ embedded.T
plt.imshow(similarity, cmap="viridis"); plt.colorbar(label="cosine similarity")
plt.xticks(range(len(names)), names, rotation=45); plt.yticks(range(len(names)), names);'''


def multimodal_notebook() -> nbformat.NotebookNode:
    """examples/multimodal.ipynb: one backbone trained on three modalities at once and aligned into one space."""
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    cells = [
        md("# One backbone, three modalities\n\nHandwritten digit images, spoken digits and videos of moving "
           "digits share the classes 0 to 9. One UniRepLKNet-A learns all three at once: each modality keeps its "
           "adapter, first convolution, BatchNorm statistics and head, everything else is shared. A contrastive "
           "term pulls each audio clip and video towards images of the same digit, so the embeddings of the three "
           "modalities land in one space: a spoken *seven* retrieves pictures of sevens.\n\nEverything runs "
           "offline on built-in data. Set `UNIPERCEPTION_NOTEBOOK_QUICK=1` for a one-epoch run on a subset."),
        code(MULTIMODAL_SETUP),
        md("## Three sets with the same classes"),
        code(MULTIMODAL_DATA),
        code(MULTIMODAL_LOOK),
        md("## One model\n\nEach modality's adapter settings are its demo recipe's."),
        code(MULTIMODAL_MODEL),
        md("## Joint training with alignment\n\nEvery step is one batch of one modality (the proportional "
           "schedule interleaves every batch of every set once per epoch). For audio and video steps the trainer "
           "also draws one image of the same digit per sample and adds the symmetric InfoNCE loss between the two "
           "sets of embeddings (`align=1.0`). Validation reports accuracy per modality, cross-modal recall and "
           "zero-shot accuracy."),
        code(MULTIMODAL_TRAIN),
        md("## Test: accuracy, retrieval across modalities, zero-shot\n\nAudio and video test samples are queries; "
           "the image test split is the gallery. A query is a hit at *k* when one of its *k* nearest images (cosine) "
           "shows its digit. Zero-shot: each audio clip or video gets the digit of the nearest image class mean."),
        code(MULTIMODAL_EVALUATE),
        md("## The embedding space as a picture\n\nColour is the digit, the marker the modality: where "
           "alignment worked, the modalities of one digit overlap."),
        code(MULTIMODAL_PICTURE),
        md("## Any mix of files\n\n`embed` takes files of several modalities in one list (sorted into modalities "
           "by suffix); the cosine similarities of two digits in three modalities:"),
        code(MULTIMODAL_MIXED),
    ]
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return book


def notebook(modality: str, spec: dict) -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    name = spec["name"]
    fill = dict(name=name, modality=modality)
    cells = [
        md(f"# {spec['title']}\n\n{spec['intro']}\n\nEverything here runs offline: the dataset is built on first "
           "use from installed packages and cached. Set `UNIPERCEPTION_NOTEBOOK_QUICK=1` for a one-epoch run on a "
           "subset."),
        code(SETUP.format(**fill)),
        md("## The data\n\nThe built-in set is made of ordinary files; its `info` says where they come from."),
        code(f'data = datasets.load("{name}")\n'
             'print(data.info["source"], "|", data.info["licence"])\nprint(data.counts, data.class_names)'),
        code(spec["look"]),
        md("## What the backbone sees\n\nThe adapter turns each raw file into the map UniRepLKNet takes."),
        code(spec["show"]),
        md("## Training\n\nUniRepLKNet-A from scratch with the demo's settings (timm's AdamW, warmup and cosine "
           "decay, label smoothing); checkpoints, `metrics.csv` and plots land in `OUTPUT`."),
        code(TRAIN.format(**fill)),
        code(CURVES),
        md("## Evaluation on the test split"),
        code(EVALUATE.format(**fill)),
        md("## Answers for a file"),
        code(PREDICT),
        md("## Deploy form and export\n\nRe-parameterisation folds every dilated branch and BatchNorm into one "
           "large kernel per block: same outputs, faster inference. The deploy form saves like any model and "
           "exports to ONNX with a dynamic batch."),
        code(DEPLOY),
        code(EXPORT.format(**fill)),
    ]
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return book


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run the notebooks and keep their outputs")
    parser.add_argument("--only", nargs="*", default=[*NOTEBOOKS, "multimodal"],
                        help="notebooks to write: modalities, or multimodal")
    args = parser.parse_args(argv)
    for modality in args.only:
        book = multimodal_notebook() if modality == "multimodal" else notebook(modality, NOTEBOOKS[modality])
        path = HERE / f"{modality}.ipynb"
        if args.execute:
            from nbclient import NotebookClient

            NotebookClient(book, timeout=3600, kernel_name="python3",
                           resources={"metadata": {"path": str(HERE.parent)}}).execute()
        nbformat.write(book, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
