"""Point clouds: PLY, PCD, XYZ, PTS files, meshes and arrays to multi-view image maps.

Loading (open3d): point files ``.ply .pcd .xyz .xyzn .xyzrgb .pts``; meshes ``.off .obj .stl .ply`` (a ``.ply`` with
faces is a mesh) sampled uniformly on their surface (``mesh_samples`` points, seeded, so a file always gives the same
sample); ``.npy``/``.npz`` arrays; arrays and tensors ``(N, 3 + extra)``; open3d ``PointCloud``/``TriangleMesh``
objects. Only ``xyz`` is kept unless ``point_features`` asks for ``"colors"`` and/or ``"normals"`` (three columns
each, in that order after ``xyz``).

Preprocessing (deterministic): clouds larger than ``max_points`` are first thinned by open3d's voxel down-sampling,
then centred on their centroid and scaled into the unit sphere, and ``num_points`` points are picked by farthest-point
sampling (batched torch, first pick = point 0). Raw form: a float64 tensor ``(N, 3 + extra)``; preprocessed sample:
float32 ``(num_points, 3 + extra)``.

Training augmentation: a random rotation about the up axis (``rotation="up"``) or a uniformly random one
(``"so3"``), an anisotropic scale drawn from ``scale_range``, a translation of up to ``translate``, and Gaussian
jitter (``jitter_sigma``, clipped at ``jitter_clip``). Normals are rotated and re-normalised with the points.

Views: ``num_views`` orthographic views at azimuths ``360° * v / num_views`` about the up axis (``up_axis``; ``"y"``
as in ModelNet and ShapeNet). With coordinates mapped so that up is ``+y``, view ``v`` at azimuth ``a`` has right
vector ``(cos a, 0, -sin a)``, up ``(0, 1, 0)`` and looks along ``-(sin a, 0, cos a)`` (view 0 is the front view,
camera on ``+z``). A point's horizontal coordinate ``u`` fixes its image column and its height its row (top row =
highest). With ``fit="extent"`` (the released recipe) each view is scaled so the cloud fills an
``(image_size - 2)``-pixel square, centred; with ``fit="sphere"`` the unit sphere's square ``[-1, 1]^2`` fills it, so
sizes compare across clouds. The square is cut into ``image_size - 2`` equal pixels per side, offset by a one-pixel
margin: pixel ``(row, col)`` of a point is at least 1 and at most ``image_size - 2``, so its 3x3 splat stays inside
the image. Geometry runs in float32 (or float64) with autocast off, whatever the batch's precision.

Projections, both batched torch in ``forward`` (GPU-ready), giving ``(B * num_views, C', S, S)``:

``p2p`` (``C' = 3``)
    the learned point-to-pixel projection of the released recipe: per-point features (1x1 conv ``C -> 8``), a k-nearest
    neighbour edge convolution (k = 32; ``[neighbour - centre, centre]`` -> 1x1 conv to 64, GroupNorm, LeakyReLU 0.2,
    max over neighbours), 1x1 conv 64 -> 64; every point's feature splatted onto its 3x3 pixel neighbourhood of each
    view by scatter-add; an image block (a ResNet basic block and a 1x1 conv); a multi-view fusion that lets the views
    attend to each other (7x7 patches, one transformer block over the patches of all views, upsampled back and merged
    with the per-view features); 1x1 conv to 3 channels, sigmoid, ImageNet normalisation. The k-NN distance matrix is
    computed in chunks of queries so it never exceeds ``knn_memory_mb``.
``depth`` (``C' = 1``)
    a parameter-free depth image per view: each pixel holds the nearest point's depth as ``0.1 + 0.45 * (t + 1)``
    (``t`` in ``[-1, 1]`` is the unit-sphere coordinate towards the camera, so nearer is brighter), spread over 3x3
    pixels, and 0 where no point projects.

The head for these maps pools each view's features and concatenates the ``num_views`` vectors of one cloud
(``maps_per_sample`` = ``num_views``).

Example::

    from modalities import create_adapter
    clouds = create_adapter("point_cloud", num_points=1024, projection="p2p")
    batch = clouds.collate([clouds.prepare("chair.ply"), clouds.prepare("table.off", train=True)])  # (2, 1024, 3)
    maps = clouds(batch)                                                                          # (8, 3, 224, 224)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import open3d as o3d
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import ModalityAdapter, register_modality
from .errors import InvalidInputError
from .image import IMAGENET_MEAN, IMAGENET_STD
from .sources import describe_source

__all__ = [
    "PointCloudAdapter",
    "P2PProjection",
    "DepthProjection",
    "farthest_point_sample",
    "knn_indices",
    "normalize_to_unit_sphere",
    "project_points",
    "splat_features",
    "view_frames",
    "POINT_FILE_SUFFIXES",
    "MESH_FILE_SUFFIXES",
]

POINT_FILE_SUFFIXES = (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts")
MESH_FILE_SUFFIXES = (".off", ".obj", ".stl", ".ply")
ARRAY_SUFFIXES = (".npy", ".npz")
PROJECTIONS = ("p2p", "depth")
FEATURES = ("colors", "normals")
# coordinates re-ordered (a proper rotation) so that the chosen up axis becomes +y
_UP_AXIS_FRAMES = {
    "y": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "z": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "x": ((0, 1, 0), (1, 0, 0), (0, 0, -1)),
}


# -------------------------------------------------------------------------------------------------------------------
# geometry: batched torch, any device


def _full_precision(points: torch.Tensor) -> torch.Tensor:
    """Coordinates for geometry: float32 at least (pixel positions and neighbours in bfloat16 are off by pixels)."""
    return points if points.dtype in (torch.float32, torch.float64) else points.float()


def _no_autocast(device: torch.device):
    """Autocast off for geometry (matrix products would otherwise run in bfloat16 or float16)."""
    if device.type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def normalize_to_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """Centre ``xyz`` on the centroid and scale it so the farthest point is at distance 1; extra columns are kept.

    ``(N, C)`` or ``(B, N, C)`` with ``C >= 3``. A cloud whose points all coincide is centred only.
    """
    xyz = points[..., :3]
    centred = xyz - xyz.mean(dim=-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    centred = centred / torch.where(radius > 0, radius, torch.ones_like(radius))
    return torch.cat([centred, points[..., 3:]], dim=-1)


def farthest_point_sample(points: torch.Tensor, num_samples: int, start: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of ``num_samples`` points picked by farthest-point sampling: each pick is the point farthest from all
    earlier picks.

    Args:
        points: ``(N, 3+)`` or ``(B, N, 3+)``; only ``xyz`` is used.
        num_samples: picks per cloud. Once every distinct position has been picked (a cloud with fewer points than
            ``num_samples``, or with duplicates), the sequence of distinct picks repeats.
        start: ``(B,)`` index of each cloud's first pick; by default point 0, or a random point when a
            ``generator`` is given (seed it for reproducible draws).

    Returns:
        ``(num_samples,)`` or ``(B, num_samples)`` int64 indices.
    """
    single = points.ndim == 2
    xyz = (points.unsqueeze(0) if single else points)[..., :3]
    batch, count = xyz.shape[:2]
    if count == 0:
        raise InvalidInputError("farthest_point_sample: the cloud has no points")
    if num_samples < 1:
        raise InvalidInputError(f"farthest_point_sample: num_samples must be positive, got {num_samples}")
    picks = min(num_samples, count)
    if start is None:
        if generator is not None:
            start = torch.randint(0, count, (batch,), generator=generator).to(xyz.device)
        else:
            start = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    xyz = _full_precision(xyz).transpose(1, 2).contiguous()  # (B, 3, N): each coordinate a contiguous row
    chosen = torch.empty(batch, picks, dtype=torch.long, device=xyz.device)
    distance = torch.full((batch, count), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    distinct = torch.full((batch,), picks, dtype=torch.long, device=xyz.device)  # picks before only repeats remain
    current = start.to(xyz.device).long()
    for i in range(picks):
        chosen[:, i] = current
        offset = xyz - xyz[rows, :, current].unsqueeze(-1)  # (B, 3, N)
        squared = offset[:, 0] * offset[:, 0]
        squared.addcmul_(offset[:, 1], offset[:, 1]).addcmul_(offset[:, 2], offset[:, 2])
        torch.minimum(distance, squared, out=distance)
        farthest, current = distance.max(dim=1)
        distinct = torch.where((farthest == 0) & (distinct == picks), torch.full_like(distinct, i + 1), distinct)
    # every distinct position picked (duplicates or fewer points than asked): cycle through the distinct picks
    order = torch.arange(num_samples, device=xyz.device).expand(batch, -1)
    chosen = chosen.gather(1, torch.remainder(order, distinct.unsqueeze(1)))
    return chosen[0] if single else chosen


def knn_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, memory_mb: float = 256.0) -> torch.Tensor:
    """Indices of the ``k`` nearest ``keys`` of every query (itself included when it is a key), nearest first.

    ``queries (B, M, 3)``, ``keys (B, N, 3)`` -> ``(B, M, k)`` int64. The ``(B, chunk, N)`` squared-distance matrix is
    built for chunks of queries small enough to stay within ``memory_mb`` megabytes, so memory does not grow with
    ``M * N``.
    """
    batch, queries_count = queries.shape[:2]
    keys_count = keys.shape[1]
    if not 1 <= k <= keys_count:
        raise InvalidInputError(f"knn_indices: k must be between 1 and the {keys_count} points, got {k}")
    queries, keys = _full_precision(queries), _full_precision(keys)
    # per query row: the product, the two sums that make the distances, and top-k's workspace
    bytes_per_row = batch * keys_count * keys.element_size() * 4
    chunk = max(1, min(queries_count, int(memory_mb * 2**20 // bytes_per_row)))
    out = []
    with _no_autocast(queries.device):
        key_norms = keys.square().sum(-1).unsqueeze(1)  # (B, 1, N)
        for begin in range(0, queries_count, chunk):
            part = queries[:, begin:begin + chunk]
            squared = torch.baddbmm(key_norms + part.square().sum(-1, keepdim=True), part, keys.transpose(1, 2),
                                    alpha=-2.0)
            out.append(squared.topk(k, dim=-1, largest=False, sorted=True).indices)
            del squared
    return torch.cat(out, dim=1)


def view_frames(num_views: int, up_axis: str = "y", dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """``(V, 3, 3)``: for each view the rows ``right``, ``up`` and ``towards the camera`` in the input coordinates.

    Computed in float64 with values within 1e-12 of 0 or +-1 snapped, so views at multiples of 90° are exact.
    """
    if up_axis not in _UP_AXIS_FRAMES:
        raise InvalidInputError(f"up_axis must be one of {sorted(_UP_AXIS_FRAMES)}, got {up_axis!r}")
    azimuth = torch.arange(num_views, dtype=torch.float64) * (2 * math.pi / num_views)
    cos, sin = azimuth.cos(), azimuth.sin()
    zero, one = torch.zeros(num_views, dtype=torch.float64), torch.ones(num_views, dtype=torch.float64)
    right = torch.stack([cos, zero, -sin], dim=-1)
    up = torch.stack([zero, one, zero], dim=-1)
    towards = torch.stack([sin, zero, cos], dim=-1)
    frames = torch.stack([right, up, towards], dim=1)  # (V, 3, 3) in up-is-y coordinates
    for exact in (0.0, 1.0, -1.0):
        frames = torch.where((frames - exact).abs() < 1e-12, torch.full_like(frames, exact), frames)
    to_y_up = torch.tensor(_UP_AXIS_FRAMES[up_axis], dtype=torch.float64)  # rows: new axes in input coordinates
    return (frames @ to_y_up).to(dtype=dtype, device=device)


def project_points(xyz: torch.Tensor, num_views: int, image_size: int, fit: str = "extent",
                   up_axis: str = "y") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthographic pixel positions of every point in every view.

    ``xyz (B, N, 3)`` -> ``rows (B, V, N)``, ``cols (B, V, N)`` (int64, in ``[1, image_size - 2]``) and ``towards
    (B, V, N)``, each point's coordinate along the view's towards-the-camera axis. See the module docstring for the
    view geometry and the two ``fit`` rules.
    """
    if fit not in ("extent", "sphere"):
        raise InvalidInputError(f"fit must be 'extent' or 'sphere', got {fit!r}")
    if image_size < 8:
        raise InvalidInputError(f"image_size must be at least 8, got {image_size}")
    xyz = _full_precision(xyz)
    frames = view_frames(num_views, up_axis, dtype=xyz.dtype, device=xyz.device)
    with _no_autocast(xyz.device):
        coords = torch.einsum("vij,bnj->bvni", frames, xyz)  # (B, V, N, 3): right, up, towards
    u, w, towards = coords.unbind(-1)
    cells = image_size - 2  # the span is cut into this many equal pixels, with a one-pixel margin on each side
    if fit == "sphere":
        low_u = torch.full_like(u[..., :1], -1.0)
        high_w = torch.full_like(w[..., :1], 1.0)
        step = torch.full_like(u[..., :1], 2.0 / cells)
        span_u = span_w = torch.full_like(u[..., :1], 2.0)
    else:
        low_u, high_u = u.amin(-1, keepdim=True), u.amax(-1, keepdim=True)
        low_w, high_w = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        span_u, span_w = high_u - low_u, high_w - low_w
        step = torch.maximum(span_u, span_w) / cells
        step = torch.where(step > 0, step, torch.ones_like(step))
    used_u = torch.ceil(span_u / step).clamp(1, cells)  # pixels the cloud covers in each direction
    used_w = torch.ceil(span_w / step).clamp(1, cells)
    # a point on the far edge of the span belongs to the last covered pixel, not one beyond it
    cols = torch.minimum(torch.floor((u - low_u) / step).clamp(min=0), used_u - 1)
    rows = torch.minimum(torch.floor((high_w - w) / step).clamp(min=0), used_w - 1)
    cols = cols + 1 + torch.div(cells - used_u, 2, rounding_mode="floor")
    rows = rows + 1 + torch.div(cells - used_w, 2, rounding_mode="floor")
    return rows.long(), cols.long(), towards


def splat_features(features: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, image_size: int) -> torch.Tensor:
    """Scatter-add each point's feature onto the 3x3 pixels around its position in each view.

    ``features (B, N, C)``, ``rows``/``cols (B, V, N)`` -> ``(B * V, C, S, S)``. The sum over a 3x3 neighbourhood of
    the points scattered to their centre pixels equals scattering every point to its 9 pixels, at a ninth of the
    memory; positions in ``[1, S - 2]`` keep the neighbourhood inside the image.
    """
    batch, views, count = rows.shape
    channels = features.shape[-1]
    pixel = (torch.arange(batch * views, device=rows.device).view(batch, views, 1) * image_size + rows) * image_size
    pixel = (pixel + cols).reshape(-1)
    values = features.unsqueeze(1).expand(batch, views, count, channels).reshape(-1, channels)
    canvas = features.new_zeros(batch * views * image_size * image_size, channels).index_add(0, pixel, values)
    canvas = rearrange(canvas, "(m h w) c -> m c h w", h=image_size, w=image_size)
    return F.avg_pool2d(canvas, 3, stride=1, padding=1, count_include_pad=True) * 9.0


class DepthProjection(nn.Module):
    """Parameter-free depth images: ``(B, N, 3+)`` -> ``(B * V, 1, S, S)`` (see the module docstring)."""

    def __init__(self, num_views: int = 4, image_size: int = 224, fit: str = "extent", up_axis: str = "y"):
        super().__init__()
        self.num_views, self.image_size, self.fit, self.up_axis = num_views, image_size, fit, up_axis

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        rows, cols, towards = project_points(points[..., :3], self.num_views, size, self.fit, self.up_axis)
        batch, views, _ = rows.shape
        brightness = (0.1 + 0.45 * (towards.clamp(-1, 1) + 1)).float()  # nearer is brighter, always > 0
        pixel = ((torch.arange(batch * views, device=rows.device).view(batch, views, 1) * size + rows) * size + cols)
        canvas = brightness.new_zeros(batch * views * size * size)
        canvas = canvas.scatter_reduce(0, pixel.reshape(-1), brightness.reshape(-1), reduce="amax", include_self=True)
        canvas = canvas.view(batch * views, 1, size, size)
        return F.max_pool2d(canvas, 3, stride=1, padding=1)


class _MultiViewFusion(nn.Module):
    """The views of one cloud attend to each other: ``(B * V, C, S, S)`` -> same shape.

    ``patch x patch`` patches (the maps zero-padded to whole patches) embedded to ``dim`` channels, one transformer
    block over the patches of all ``V`` views of a cloud, upsampled back (nearest), a 3x3 conv with GELU, then merged
    with the input by a 1x1 conv with GELU.
    """

    def __init__(self, channels: int, num_views: int, dim: int = 128, patch: int = 7, heads: int = 8):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.num_views, self.patch = num_views, patch
        self.embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.block = Block(dim, num_heads=heads, mlp_ratio=2.0)
        self.expand = nn.Sequential(nn.Conv2d(dim, channels, 3, padding=1), nn.GELU())
        self.merge = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.GELU())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        size = maps.shape[-1]
        side = math.ceil(size / self.patch)
        padded = F.pad(maps, (0, side * self.patch - size, 0, side * self.patch - size))  # whole patches only
        tokens = rearrange(self.embed(padded), "(b v) c h w -> b (v h w) c", v=self.num_views)
        tokens = self.block(tokens)
        tokens = rearrange(tokens, "b (v h w) c -> (b v) c h w", v=self.num_views, h=side, w=side)
        tokens = F.interpolate(tokens, scale_factor=self.patch, mode="nearest")[..., :size, :size]
        return self.merge(torch.cat([self.expand(tokens), maps], dim=1))


class P2PProjection(nn.Module):
    """The learned point-to-pixel projection: ``(B, N, C)`` points -> ``(B * V, 3, S, S)`` ImageNet-normalised images.

    Args:
        in_features: point columns ``C`` (3 for ``xyz``; 6 or 9 with colours and/or normals).
        num_views, image_size, fit, up_axis: the views (see :func:`project_points`).
        neighbours: k of the k-NN edge convolution (fewer when a cloud has fewer points).
        point_dim, graph_dim: widths of the per-point and edge features (8 and 64 in the released recipe).
        fusion: let the views attend to each other (the released recipe does).
        knn_memory_mb: bound on the k-NN distance matrix.
    """

    def __init__(self, in_features: int = 3, num_views: int = 4, image_size: int = 224, fit: str = "extent",
                 up_axis: str = "y", neighbours: int = 32, point_dim: int = 8, graph_dim: int = 64,
                 fusion: bool = True, knn_memory_mb: float = 256.0):
        super().__init__()
        from timm.models.resnet import BasicBlock

        self.num_views, self.image_size, self.fit, self.up_axis = num_views, image_size, fit, up_axis
        self.neighbours, self.knn_memory_mb = neighbours, knn_memory_mb
        self.point_embed = nn.Linear(in_features, point_dim)
        self.edge_conv = nn.Conv2d(2 * point_dim, graph_dim, kernel_size=1, bias=False)
        self.edge_norm = nn.GroupNorm(4, graph_dim)
        self.point_proj = nn.Linear(graph_dim, graph_dim)
        self.image_block = nn.Sequential(BasicBlock(graph_dim, graph_dim), nn.Conv2d(graph_dim, graph_dim, 1))
        self.fusion = _MultiViewFusion(graph_dim, num_views) if fusion and image_size >= 7 else None
        self.to_rgb = nn.Conv2d(graph_dim, 3, kernel_size=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> ``(B, N, graph_dim)``: per-point embedding and k-NN edge convolution."""
        xyz = points[..., :3]  # neighbours from the coordinates as given (knn_indices works in float32 at least)
        features = self.point_embed(points.to(self.point_embed.weight.dtype))  # (B, N, d)
        k = min(self.neighbours, points.shape[1])
        with torch.no_grad():
            neighbours = knn_indices(xyz.detach(), xyz.detach(), k, self.knn_memory_mb)  # (B, N, k)
        batch, count, dim = features.shape
        gathered = torch.gather(features, 1, neighbours.reshape(batch, count * k, 1).expand(-1, -1, dim))
        gathered = gathered.view(batch, count, k, dim)
        centre = features.unsqueeze(2).expand(-1, -1, k, -1)
        edges = rearrange(torch.cat([gathered - centre, centre], dim=-1), "b n k c -> b c n k")
        edges = F.leaky_relu(self.edge_norm(self.edge_conv(edges)), negative_slope=0.2)
        return self.point_proj(edges.amax(dim=-1).transpose(1, 2))  # (B, N, graph_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = project_points(points[..., :3], self.num_views, self.image_size, self.fit, self.up_axis)
        maps = splat_features(self.point_features(points), rows, cols, self.image_size)
        maps = self.image_block(maps)
        if self.fusion is not None:
            maps = self.fusion(maps)
        return (torch.sigmoid(self.to_rgb(maps)) - self.mean) / self.std


# -------------------------------------------------------------------------------------------------------------------
# the adapter


# open3d's readers and its random seed are process-wide: one reader at a time (threads of a DataLoader included)
_OPEN3D_LOCK = threading.RLock()


@contextlib.contextmanager
def _open3d_messages():
    """Collect what open3d's readers print while the block runs (they report a truncated or corrupt file only as a
    printed warning and return what they read so far). Yields a list that holds the printed lines afterwards. The
    process's stdout and stderr are redirected meanwhile, under a lock, so concurrent loads cannot lose them."""
    with _OPEN3D_LOCK:
        with _redirected_output() as lines:
            yield lines


@contextlib.contextmanager
def _redirected_output():
    lines: List[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    printed = io.StringIO()  # open3d's log goes through Python's sys.stdout when Python has replaced it
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)  # the file parsers' own messages go to the process's stdout and stderr
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), \
                    o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Warning):
                yield lines
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
            lines.extend(printed.getvalue().splitlines())


def _raise_on_failure(lines: List[str], name: str, suffix: str) -> None:
    failures = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in lines
                if re.search(r"fail|unable|error", line, re.IGNORECASE)]
    if failures:
        raise InvalidInputError(f"{name}: not a readable {suffix} file (open3d: {'; '.join(dict.fromkeys(failures))})")


@register_modality("point_cloud")
class PointCloudAdapter(ModalityAdapter):
    """Point clouds and meshes to ``num_views`` image maps per cloud.

    Args:
        num_points: points per cloud after farthest-point sampling (1024; the paper used 4096).
        projection: ``"p2p"`` (learned, 3 channels) or ``"depth"`` (parameter-free, 1 channel).
        num_views: views per cloud (4 in the released code; the paper's text says 3).
        image_size: side ``S`` of each view's map (224 in the recipe).
        fit: ``"extent"`` (each view fills the image, as released) or ``"sphere"`` (the unit sphere fills it).
        up_axis: the data's up axis, ``"y"`` (ModelNet, ShapeNet), ``"z"`` or ``"x"``; views turn about it.
        point_features: extra columns to keep, any of ``"colors"``, ``"normals"``.
        mesh_samples: points sampled on a mesh's surface before farthest-point sampling (default ``4 * num_points``).
        max_points: larger clouds are voxel down-sampled to about this many points first.
        neighbours, fusion, knn_memory_mb: the ``p2p`` projection's k-NN size, multi-view fusion and memory bound.
        rotation: training rotation, ``"up"``, ``"so3"`` or ``"none"``.
        scale_range, translate, jitter_sigma, jitter_clip: the other training augmentations (0 or ``None`` disables).
        seed: seed of mesh surface sampling and of the voxel fallback's subsampling.
    """

    def __init__(
        self,
        num_points: int = 1024,
        projection: str = "p2p",
        num_views: int = 4,
        image_size: int = 224,
        fit: str = "extent",
        up_axis: str = "y",
        point_features: Sequence[str] = (),
        mesh_samples: Optional[int] = None,
        max_points: int = 65536,
        neighbours: int = 32,
        fusion: bool = True,
        knn_memory_mb: float = 256.0,
        rotation: str = "up",
        scale_range: Optional[Sequence[float]] = (2.0 / 3.0, 1.5),
        translate: float = 0.2,
        jitter_sigma: float = 0.01,
        jitter_clip: float = 0.05,
        seed: int = 0,
    ):
        point_features = list(point_features)
        if projection not in PROJECTIONS:
            raise InvalidInputError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        unknown = [f for f in point_features if f not in FEATURES]
        if unknown or len(set(point_features)) != len(point_features):
            raise InvalidInputError(f"point_features may hold each of {FEATURES} once, got {point_features}")
        if num_points < 1 or num_views < 1 or max_points < num_points:
            raise InvalidInputError(
                f"need num_points >= 1, num_views >= 1 and max_points >= num_points, got {num_points}, {num_views}, "
                f"{max_points}"
            )
        if image_size < 32:
            raise InvalidInputError(f"image_size must be at least 32 (the backbone's smallest input), got {image_size}")
        if rotation not in ("up", "so3", "none"):
            raise InvalidInputError(f"rotation must be 'up', 'so3' or 'none', got {rotation!r}")
        if fit not in ("extent", "sphere"):
            raise InvalidInputError(f"fit must be 'extent' or 'sphere', got {fit!r}")
        if up_axis not in _UP_AXIS_FRAMES:
            raise InvalidInputError(f"up_axis must be one of {sorted(_UP_AXIS_FRAMES)}, got {up_axis!r}")
        if neighbours < 1 or knn_memory_mb <= 0 or translate < 0 or jitter_sigma < 0 or jitter_clip < 0 \
                or (mesh_samples is not None and mesh_samples < 1):
            raise InvalidInputError(
                "need neighbours >= 1, knn_memory_mb > 0, translate, jitter_sigma and jitter_clip >= 0 and "
                f"mesh_samples >= 1, got {neighbours}, {knn_memory_mb}, {translate}, {jitter_sigma}, {jitter_clip}, "
                f"{mesh_samples}"
            )
        if scale_range is not None:
            scale_range = [float(s) for s in scale_range]
            if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
                raise InvalidInputError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        super().__init__(
            num_points=num_points, projection=projection, num_views=num_views, image_size=image_size, fit=fit,
            up_axis=up_axis, point_features=point_features, mesh_samples=mesh_samples, max_points=max_points,
            neighbours=neighbours, fusion=fusion, knn_memory_mb=knn_memory_mb, rotation=rotation,
            scale_range=scale_range, translate=translate, jitter_sigma=jitter_sigma, jitter_clip=jitter_clip,
            seed=seed,
        )
        self.num_points, self.projection_name, self.num_views = num_points, projection, num_views
        self.image_size, self.fit, self.up_axis = image_size, fit, up_axis
        self.point_features = point_features
        self.mesh_samples = mesh_samples or 4 * num_points
        self.max_points, self.seed = max_points, seed
        self.rotation, self.scale_range, self.translate = rotation, scale_range, translate
        self.jitter_sigma, self.jitter_clip = jitter_sigma, jitter_clip
        if projection == "p2p":
            self.projection = P2PProjection(self.in_features, num_views, image_size, fit, up_axis, neighbours,
                                            fusion=fusion, knn_memory_mb=knn_memory_mb)
        else:
            self.projection = DepthProjection(num_views, image_size, fit, up_axis)

    @property
    def in_features(self) -> int:
        """Columns of a point: ``xyz`` plus three per extra feature."""
        return 3 + 3 * len(self.point_features)

    @property
    def out_channels(self) -> int:
        return 3 if self.projection_name == "p2p" else 1

    @property
    def maps_per_sample(self) -> int:
        return self.num_views

    # ---------------------------------------------------------------------------------------------------------------
    # loading

    def load(self, source: Any) -> torch.Tensor:
        """A path, bytes or file object (point file, mesh, ``.npy``/``.npz``), an array or tensor ``(N, 3+)``, or an
        open3d ``PointCloud``/``TriangleMesh`` -> float64 ``(N, 3 + extra)`` (float64 so that georeferenced
        coordinates keep their precision until they are centred)."""
        name = describe_source(source)
        if isinstance(source, o3d.geometry.TriangleMesh):
            return self._checked(self._from_mesh(source, name), name)
        if isinstance(source, o3d.geometry.PointCloud):
            return self._checked(self._from_point_cloud(source, name), name)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return self._checked(self._from_array(source, name), name)
        if isinstance(source, (str, os.PathLike)):
            return self._checked(self._from_path(Path(source), name), name)
        if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
            data = bytes(source) if not hasattr(source, "read") else source.read()
            if isinstance(data, str):  # a file opened in text mode
                data = data.encode("utf-8")
            suffix = Path(getattr(source, "name", "") or "").suffix.lower()
            return self._checked(self._from_bytes(data, suffix, name), name)
        raise InvalidInputError(
            f"{name}: cannot read a point cloud from {type(source).__name__}; give a path, bytes, a file object, an "
            f"array (N, {self.in_features}) or an open3d PointCloud/TriangleMesh"
        )

    def _from_path(self, path: Path, name: str) -> torch.Tensor:
        if not path.is_file():
            raise InvalidInputError(f"{name}: no such point-cloud file")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"{name}: the file is empty")
        suffix = path.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            return self._from_bytes(path.read_bytes(), suffix, name)
        if suffix not in POINT_FILE_SUFFIXES + MESH_FILE_SUFFIXES:
            raise InvalidInputError(
                f"{name}: unsupported point-cloud format {suffix or '(no suffix)'}; expected one of "
                f"{', '.join(sorted(set(POINT_FILE_SUFFIXES + MESH_FILE_SUFFIXES + ARRAY_SUFFIXES)))}"
            )
        if suffix in MESH_FILE_SUFFIXES:
            with _open3d_messages() as messages:
                mesh = o3d.io.read_triangle_mesh(str(path))
            _raise_on_failure(messages, name, suffix)
            if len(mesh.triangles) > 0:
                return self._from_mesh(mesh, name)
            if suffix != ".ply":  # only a PLY file may hold points without faces
                raise InvalidInputError(f"{name}: the {suffix} mesh has no faces")
        with _open3d_messages() as messages:
            cloud = o3d.io.read_point_cloud(str(path))
        _raise_on_failure(messages, name, suffix)
        if len(cloud.points) == 0:
            raise InvalidInputError(f"{name}: not a readable {suffix} file (open3d found no points)")
        return self._from_point_cloud(cloud, name)

    def _from_bytes(self, data: bytes, suffix: str, name: str) -> torch.Tensor:
        if len(data) == 0:
            raise InvalidInputError(f"{name}: no point-cloud data (0 bytes)")
        head = data[:16]
        if head.startswith(b"\x93NUMPY") or head.startswith(b"PK") or suffix in ARRAY_SUFFIXES:
            try:
                loaded = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise InvalidInputError(f"{name}: not a readable .npy/.npz array ({exc})") from exc
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    keys = list(loaded.keys())
                    key = "points" if "points" in keys else (keys[0] if len(keys) == 1 else None)
                    if key is None:
                        raise InvalidInputError(
                            f"{name}: the .npz holds {keys}; name the array 'points' or store only one"
                        )
                    loaded = loaded[key]
            return self._from_array(loaded, name)
        sniffed = suffix if suffix in POINT_FILE_SUFFIXES + MESH_FILE_SUFFIXES else None
        if sniffed is None:
            if head.startswith(b"ply"):
                sniffed = ".ply"
            elif head.startswith(b"# .PCD") or head.startswith(b"VERSION"):
                sniffed = ".pcd"
            elif head.startswith(b"OFF"):
                sniffed = ".off"
        if sniffed is None:
            raise InvalidInputError(
                f"{name}: cannot tell the format of these bytes; bytes and file objects may hold .npy/.npz, PLY, PCD "
                f"or OFF data (or give a file object whose name has the suffix), and any format as a path"
            )
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"cloud{sniffed}"
            path.write_bytes(data)
            try:
                return self._from_path(path, name)
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc).replace(str(path), name)) from None

    def _from_array(self, array: Any, name: str) -> torch.Tensor:
        try:
            tensor = torch.as_tensor(array.detach().cpu() if isinstance(array, torch.Tensor) else np.asarray(array))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"{name}: points must be numbers ({exc})") from None
        if tensor.ndim != 2 or tensor.shape[1] < self.in_features:
            raise InvalidInputError(
                f"{name}: expected points (N, {self.in_features}) (xyz{''.join(', ' + f for f in self.point_features)}"
                f"), got shape {tuple(tensor.shape)}"
            )
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                                torch.uint8)):
            raise InvalidInputError(f"{name}: unsupported point dtype {tensor.dtype}")
        return tensor[:, : self.in_features].double()

    def _from_point_cloud(self, cloud: "o3d.geometry.PointCloud", name: str) -> torch.Tensor:
        columns = [np.asarray(cloud.points)]
        for feature in self.point_features:
            present = cloud.has_colors() if feature == "colors" else cloud.has_normals()
            if not present:
                raise InvalidInputError(f"{name}: point_features asks for {feature}, but the cloud has none")
            columns.append(np.asarray(cloud.colors if feature == "colors" else cloud.normals))
        return torch.from_numpy(np.concatenate(columns, axis=1)).double()

    def _from_mesh(self, mesh: "o3d.geometry.TriangleMesh", name: str) -> torch.Tensor:
        if len(mesh.triangles) == 0:
            raise InvalidInputError(f"{name}: the mesh has no triangles")
        triangles, count = np.asarray(mesh.triangles), len(mesh.vertices)
        outside = ((triangles < 0) | (triangles >= count)).any(axis=1)
        if outside.any():  # open3d would read past its vertex array (and may crash the process)
            face = int(np.argmax(outside))
            raise InvalidInputError(
                f"{name}: face {face} refers to vertex {triangles[face].tolist()}, but the mesh has {count} vertices"
            )
        if "colors" in self.point_features and not mesh.has_vertex_colors():
            raise InvalidInputError(f"{name}: point_features asks for colors, but the mesh has no vertex colours")
        vertices = np.asarray(mesh.vertices)
        if not np.isfinite(vertices).all():
            raise InvalidInputError(f"{name}: the mesh's vertices hold NaN or infinite values")
        if "normals" in self.point_features:
            mesh.compute_triangle_normals()
        area = mesh.get_surface_area()
        if not area > 0:
            raise InvalidInputError(f"{name}: the mesh has no surface area (all triangles are degenerate)")
        with _OPEN3D_LOCK, o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            o3d.utility.random.seed(self.seed)
            cloud = mesh.sample_points_uniformly(self.mesh_samples, use_triangle_normal="normals" in
                                                 self.point_features)
        return self._from_point_cloud(cloud, name)

    def _checked(self, points: torch.Tensor, name: str) -> torch.Tensor:
        if points.shape[0] == 0:
            raise InvalidInputError(f"{name}: the cloud has no points")
        if not torch.isfinite(points).all():
            bad = int((~torch.isfinite(points)).any(dim=1).nonzero()[0])
            raise InvalidInputError(f"{name}: point {bad} holds NaN or infinite values")
        xyz = points[:, :3]
        if bool((xyz == xyz[:1]).all()):
            raise InvalidInputError(f"{name}: all {points.shape[0]} points coincide; a cloud needs extent")
        return points

    # ---------------------------------------------------------------------------------------------------------------
    # preprocessing and augmentation

    def voxel_downsample(self, points: torch.Tensor) -> torch.Tensor:
        """Thin a cloud of more than ``max_points`` points with open3d's voxel grid (colours and normals averaged,
        normals re-normalised), growing the voxel until at most ``max_points`` remain; seeded random subsampling
        finishes the job after eight tries, and replaces the voxel grid when outliers made it so coarse that fewer
        than a quarter of ``max_points`` would remain."""
        if points.shape[0] <= self.max_points:
            return points
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[:, :3].double().numpy()))
        offset = 3
        for feature in self.point_features:
            values = o3d.utility.Vector3dVector(points[:, offset:offset + 3].double().numpy())
            if feature == "colors":
                cloud.colors = values
            else:
                cloud.normals = values
            offset += 3
        extent = points[:, :3].amax(0) - points[:, :3].amin(0)
        voxel = float(extent.norm()) / math.sqrt(self.max_points)  # a surface of this diagonal in voxels this size
        thinned = cloud
        for _ in range(8):
            thinned = cloud.voxel_down_sample(voxel)
            if len(thinned.points) <= self.max_points:
                break
            voxel *= math.sqrt(len(thinned.points) / self.max_points) * 1.05
        result = self._from_point_cloud(thinned, "voxel down-sampling")
        if "normals" in self.point_features:  # averaged normals are shorter than 1
            at = 3 + 3 * self.point_features.index("normals")
            result[:, at:at + 3] = F.normalize(result[:, at:at + 3], dim=1)
        if result.shape[0] < self.max_points // 4:
            result = points  # outliers made the voxels too coarse: subsample the original instead
        if result.shape[0] > self.max_points:
            keep = torch.randperm(result.shape[0], generator=torch.Generator().manual_seed(self.seed))
            result = result[keep[: self.max_points].sort().values]
        return result

    def example(self, seed: int = 0) -> np.ndarray:
        """Points on a unit sphere ``(2 * num_points, C)`` float32 with, when asked, colours in [0, 1] and the unit
        normals."""
        rng = np.random.default_rng(seed)
        xyz = rng.standard_normal((2 * self.num_points, 3))
        xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
        columns = [xyz] + [rng.uniform(0, 1, xyz.shape) if feature == "colors" else xyz
                           for feature in self.point_features]
        return np.concatenate(columns, axis=1).astype(np.float32)

    def preprocess(self, raw: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` -> float32 ``(num_points, C)``: voxel thinning of huge clouds, centring on the centroid and
        scaling into the unit sphere (in float64), then farthest-point sampling."""
        points = normalize_to_unit_sphere(self.voxel_downsample(raw.double()))
        return points[farthest_point_sample(points, self.num_points)].float().contiguous()

    def augment(self, sample: torch.Tensor) -> torch.Tensor:
        """Random rotation, anisotropic scale, translation and jitter of one ``(P, C)`` sample."""
        xyz = sample[:, :3]
        where = {"dtype": sample.dtype, "device": sample.device}
        rotation = self._random_rotation(sample.dtype).to(sample.device)
        xyz = xyz @ rotation.T
        scale = torch.ones(3, **where)
        if self.scale_range is not None:
            low, high = self.scale_range
            scale = torch.empty(3, **where).uniform_(low, high)
            xyz = xyz * scale
        if self.translate:
            xyz = xyz + torch.empty(3, **where).uniform_(-self.translate, self.translate)
        if self.jitter_sigma:
            noise = torch.randn_like(xyz) * self.jitter_sigma
            xyz = xyz + (noise.clamp(-self.jitter_clip, self.jitter_clip) if self.jitter_clip else noise)
        columns = [xyz]
        offset = 3
        for feature in self.point_features:
            values = sample[:, offset:offset + 3]
            if feature == "normals":  # normals follow the rotation and the inverse scale
                values = F.normalize((values @ rotation.T) / scale, dim=1)
            columns.append(values)
            offset += 3
        return torch.cat(columns, dim=1)

    def _random_rotation(self, dtype: torch.dtype) -> torch.Tensor:
        if self.rotation == "none":
            return torch.eye(3, dtype=dtype)
        if self.rotation == "so3":  # uniform on SO(3): QR of a Gaussian matrix with the sign fixed
            q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
            if torch.det(q) < 0:
                q[:, 0] = -q[:, 0]
            return q.to(dtype)
        angle = float(torch.rand(())) * 2 * math.pi
        cos, sin = math.cos(angle), math.sin(angle)
        about_y = torch.tensor([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]], dtype=torch.float64)
        to_y_up = torch.tensor(_UP_AXIS_FRAMES[self.up_axis], dtype=torch.float64)
        return (to_y_up.T @ about_y @ to_y_up).to(dtype)

    # ---------------------------------------------------------------------------------------------------------------
    # the learnable (or parameter-free) projection

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, P, C)`` points -> ``(B * num_views, out_channels, image_size, image_size)``."""
        if batch.ndim != 3 or batch.shape[2] != self.in_features or batch.shape[1] < 1:
            raise InvalidInputError(
                f"point_cloud: expected a batch of points (B, P, {self.in_features}), got {tuple(batch.shape)}"
            )
        if not batch.is_floating_point():
            raise InvalidInputError(f"point_cloud: expected floating-point points, got {batch.dtype}")
        tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and not bool(torch.isfinite(batch).all()):  # a data-dependent check: eager mode only
            raise InvalidInputError("point_cloud: the batch holds NaN or infinite coordinates")
        return self.projection(batch)

    def encode(self, batch: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return self(batch), {"maps_per_sample": self.num_views}

    def view_images(self, sample: torch.Tensor) -> List[torch.Tensor]:
        """The ``num_views`` maps of one preprocessed sample ``(P, C)``, for display: a list of ``(C', S, S)``."""
        with torch.no_grad():
            return list(self(sample.unsqueeze(0)).unbind(0))
