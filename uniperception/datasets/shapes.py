"""``primitives``: point clouds sampled from the surfaces of open3d's primitive meshes.

Eight shapes with random proportions (each dimension drawn independently), a random rotation in SO(3), a random
offset, uniform surface sampling and Gaussian jitter; written as binary PLY point clouds with open3d.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
from tqdm.auto import tqdm

from . import SPLITS, quiet

SEED = 20240918
POINTS = 2048
PER_CLASS = {"train": 80, "val": 20, "test": 30}


def _makers() -> Dict[str, Callable[[np.random.Generator], Any]]:
    import open3d as o3d

    mesh = o3d.geometry.TriangleMesh

    def u(rng, low, high):
        return float(rng.uniform(low, high))

    return {
        "box": lambda r: mesh.create_box(u(r, 0.3, 1.5), u(r, 0.3, 1.5), u(r, 0.3, 1.5)),
        "sphere": lambda r: mesh.create_sphere(u(r, 0.4, 1.0), resolution=30),
        "cylinder": lambda r: mesh.create_cylinder(u(r, 0.2, 0.6), u(r, 0.8, 2.0), resolution=40, split=4),
        "cone": lambda r: mesh.create_cone(u(r, 0.3, 0.8), u(r, 0.6, 1.8), resolution=40, split=4),
        "torus": lambda r: mesh.create_torus(torus_radius=u(r, 0.6, 1.0), tube_radius=u(r, 0.12, 0.35),
                                             radial_resolution=40, tubular_resolution=20),
        "tetrahedron": lambda r: mesh.create_tetrahedron(u(r, 0.5, 1.2)),
        "octahedron": lambda r: mesh.create_octahedron(u(r, 0.5, 1.2)),
        "icosahedron": lambda r: mesh.create_icosahedron(u(r, 0.5, 1.2)),
    }


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform on SO(3): QR of a Gaussian matrix with the signs fixed."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _cloud(make, rng: np.random.Generator):
    import open3d as o3d

    shape = make(rng)
    if rng.random() < 0.5:  # half of the shapes are also stretched along each axis
        vertices = np.asarray(shape.vertices) * rng.uniform(0.8, 1.25, 3)
        shape.vertices = o3d.utility.Vector3dVector(vertices)
    shape.rotate(_random_rotation(rng), center=(0, 0, 0))
    shape.translate(rng.uniform(-0.5, 0.5, 3))
    o3d.utility.random.seed(int(rng.integers(2**31 - 1)))  # open3d's sampler draws from its global generator
    cloud = shape.sample_points_uniformly(number_of_points=POINTS)
    points = np.asarray(cloud.points)
    extent = np.linalg.norm(points.max(0) - points.min(0))
    points = points + rng.normal(0, 0.005 * extent, points.shape)
    return o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))


def build_primitives(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    import open3d as o3d

    makers = _makers()
    rng = np.random.default_rng(SEED)
    counts = {}
    for split in SPLITS:
        jobs = [(name, i) for name in makers for i in range(PER_CLASS[split])]
        for name in makers:
            (target / split / name).mkdir(parents=True)
        for name, i in tqdm(jobs, desc=f"primitives {split}", disable=quiet(progress), leave=False):
            path = target / split / name / f"{i:04d}.ply"
            if not o3d.io.write_point_cloud(str(path), _cloud(makers[name], rng), write_ascii=False):
                from . import DatasetBuildError

                raise DatasetBuildError(f"{path}: open3d could not write the point cloud")
        counts[split] = len(jobs)
    return dict(
        source=f"open3d {o3d.__version__} TriangleMesh primitives, sampled with sample_points_uniformly",
        licence="generated here (open3d is MIT-licensed); no third-party data",
        classes=sorted(makers), counts=counts,
        description=f"{POINTS} points per binary PLY file. Sizes drawn per shape (box sides 0.3-1.5, sphere radius "
                    "0.4-1.0, cylinder radius 0.2-0.6 and height 0.8-2.0, cone radius 0.3-0.8 and height 0.6-1.8, "
                    "torus radii 0.6-1.0 and 0.12-0.35, platonic solids 0.5-1.2), half of them also stretched "
                    "0.8-1.25x per axis; uniform random rotation, offset up to 0.5 per axis, Gaussian jitter of "
                    f"0.5% of the diagonal. Seed {SEED}.",
    )
