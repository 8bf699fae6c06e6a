"""Point clouds: files written by open3d, sampling, normalisation, the two projections and their pixel geometry."""

import io
import math
import os

import numpy as np
import open3d as o3d
import pytest
import timm
import torch

import backbones  # noqa: F401
from modalities import InvalidInputError, create_adapter
from modalities.point_cloud import (
    farthest_point_sample,
    knn_indices,
    normalize_to_unit_sphere,
    project_points,
    splat_features,
    view_frames,
)

SIZE = 34  # 32 pixels of 2/32 for a cloud spanning [-1, 1]: exact in binary floating point


def cube_with_marker(marker):
    corners = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    return torch.cat([corners, torch.tensor([marker])]).unsqueeze(0)  # (1, 9, 3)


def random_cloud(count=500, seed=0, extra=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 3 + extra)).astype(np.float64)


# --- pixel geometry ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fit", ["extent", "sphere"])
def test_known_point_lands_on_expected_pixel_in_each_view(fit):
    # a cube spanning [-1, 1]^3 (y up) and a marker on the top edge, right of centre in the front view
    points = cube_with_marker([1.0, 1.0, 0.0])
    rows, cols, towards = project_points(points, num_views=4, image_size=SIZE, fit=fit)
    marker_rows, marker_cols = rows[0, :, -1].tolist(), cols[0, :, -1].tolist()
    middle = 1 + 16  # u = 0 is 16 cells of 1/16 from the left edge
    # view 0 looks along -z (right = +x), view 1 (90°) has right = -z, view 2 right = -x, view 3 right = +z
    assert marker_rows == [1, 1, 1, 1]  # y = 1 is the top row in every view
    assert marker_cols == [SIZE - 2, middle, 1, middle]
    assert towards[0, :, -1].tolist() == pytest.approx([0.0, 1.0, 0.0, -1.0], abs=1e-6)
    # the corners fill the image to its margins
    assert rows.min() == 1 and rows.max() == SIZE - 2 and cols.min() == 1 and cols.max() == SIZE - 2


def test_up_axis_z_puts_z_at_the_top():
    points = cube_with_marker([0.0, 0.0, 1.0])  # the top in z-up data
    rows, cols, _ = project_points(points, 4, SIZE, up_axis="z")
    assert rows[0, :, -1].tolist() == [1, 1, 1, 1]
    frames = view_frames(4, up_axis="z", dtype=torch.float64)
    assert torch.allclose(frames @ frames.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    assert torch.allclose(torch.linalg.det(frames), torch.ones(4, dtype=torch.float64))


def test_extent_fit_centres_a_flat_cloud():
    points = torch.tensor([[[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, -0.5, 0.0]]])
    rows, cols, _ = project_points(points, 1, SIZE)
    assert cols.min() == 1 and cols.max() == SIZE - 2
    assert rows.min() - 1 == SIZE - 2 - rows.max()  # as much margin above as below


def test_splat_covers_the_three_by_three_neighbourhood():
    features = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]])
    rows = torch.tensor([[[5, 5]]])
    cols = torch.tensor([[[5, 6]]])
    grid = splat_features(features, rows, cols, 12)  # (1, 2, 12, 12)
    expected = torch.zeros(2, 12, 12)
    expected[:, 4:7, 4:7] += torch.tensor([1.0, 2.0]).view(2, 1, 1)
    expected[:, 4:7, 5:8] += torch.tensor([10.0, 20.0]).view(2, 1, 1)
    assert torch.allclose(grid[0], expected, atol=1e-5)


def test_depth_projection_keeps_the_nearest_point():
    adapter = create_adapter("point_cloud", projection="depth", num_views=4, image_size=SIZE, fit="sphere")
    # two points on the same line of sight of view 0 (same x, y): z = 0.8 is nearer to the camera on +z
    points = torch.tensor([[[0.0, 0.0, 0.8], [0.0, 0.0, -0.8], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]])
    images = adapter(points)
    assert images.shape == (4, 1, SIZE, SIZE)
    centre = images[0, 0, 17, 17].item()  # (0, 0) is 16 pixels from the edge of the square, plus the margin
    assert centre == pytest.approx(0.1 + 0.45 * 1.8)
    assert images[0, 0, 0:3, 10].eq(0).all()  # nothing projects there
    assert images[0, 0, 16:19, 16:19].eq(centre).all()  # spread over 3x3


# --- sampling and normalisation ------------------------------------------------------------------------------------

def test_farthest_point_sampling_picks_the_known_farthest_points():
    rng = np.random.default_rng(0)
    cluster = torch.from_numpy(rng.uniform(-0.05, 0.05, (200, 3))).float()
    far = torch.tensor([[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, 0, -5.0]])
    points = torch.cat([cluster, far])
    picked = farthest_point_sample(points, 5)
    assert picked[0] == 0
    assert set(picked[1:].tolist()) == {200, 201, 202, 203}
    everything = farthest_point_sample(points, points.shape[0])
    assert sorted(everything.tolist()) == list(range(points.shape[0]))  # distinct points, all of them


def test_farthest_point_sampling_is_batched_seeded_and_cycles_when_short():
    clouds = torch.randn(3, 100, 3)
    batched = farthest_point_sample(clouds, 20)
    for b in range(3):
        assert torch.equal(batched[b], farthest_point_sample(clouds[b], 20))
        assert len(set(batched[b].tolist())) == 20
    first = farthest_point_sample(clouds, 20, generator=torch.Generator().manual_seed(7))
    again = farthest_point_sample(clouds, 20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    short = farthest_point_sample(clouds[0, :6], 10)
    assert sorted(short[:6].tolist()) == list(range(6)) and torch.equal(short[6:], short[:4])


def test_knn_chunked_equals_full_distance_matrix():
    points = torch.randn(2, 300, 3)
    full = torch.cdist(points, points).topk(8, largest=False).indices
    tiny_budget = knn_indices(points, points, 8, memory_mb=0.01)  # forces chunks of a handful of queries
    assert torch.equal(tiny_budget, knn_indices(points, points, 8))
    distances = torch.cdist(points, points)
    assert torch.allclose(distances.gather(2, tiny_budget), distances.gather(2, full), atol=1e-5)
    assert torch.equal(tiny_budget[..., 0], torch.arange(300).expand(2, 300))  # each point is its own nearest


def test_normalisation_is_invariant_to_translation_and_scale():
    points = torch.from_numpy(random_cloud(400, extra=3)).float()
    moved = points.clone()
    moved[:, :3] = points[:, :3] * 7.5 + torch.tensor([3.0, -20.0, 0.5])
    a, b = normalize_to_unit_sphere(points), normalize_to_unit_sphere(moved)
    assert torch.allclose(a, b, atol=1e-5)
    assert a[:, :3].norm(dim=1).max() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(a[:, :3].mean(0), torch.zeros(3), atol=1e-6)
    assert torch.equal(a[:, 3:], points[:, 3:])  # extra columns untouched


# --- files written by open3d ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts"])
def test_point_files_written_by_open3d_load_back(tmp_path, suffix):
    xyz = random_cloud(300)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    cloud.colors = o3d.utility.Vector3dVector(np.random.default_rng(1).uniform(0, 1, (300, 3)))
    cloud.normals = o3d.utility.Vector3dVector(random_cloud(300, seed=2))
    path = tmp_path / f"cloud{suffix}"
    assert o3d.io.write_point_cloud(str(path), cloud)
    loaded = create_adapter("point_cloud").load(path)
    assert loaded.shape == (300, 3)
    assert np.allclose(loaded.numpy(), xyz, atol=1e-6)


def test_colours_and_normals_are_kept_on_request(tmp_path):
    rng = np.random.default_rng(3)
    xyz, colours = random_cloud(200), rng.uniform(0, 1, (200, 3))
    normals = random_cloud(200, seed=4)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    cloud.colors, cloud.normals = o3d.utility.Vector3dVector(colours), o3d.utility.Vector3dVector(normals)
    path = tmp_path / "coloured.ply"
    o3d.io.write_point_cloud(str(path), cloud)
    adapter = create_adapter("point_cloud", point_features=["colors", "normals"], num_points=64, image_size=32)
    loaded = adapter.load(path)
    assert loaded.shape == (200, 9)
    assert np.allclose(loaded[:, 3:6].numpy(), colours, atol=0.5 / 255 + 1e-6)  # PLY stores 8-bit colour
    assert np.allclose(loaded[:, 6:].numpy(), normals, atol=1e-6)
    sample = adapter.augment(adapter.preprocess(loaded))
    assert sample.shape == (64, 9)
    assert torch.allclose(sample[:, 6:].norm(dim=1), torch.ones(64), atol=1e-5)  # normals stay unit vectors
    assert adapter(sample.unsqueeze(0)).shape == (4, 3, 32, 32)
    xyz_only = tmp_path / "plain.xyz"
    o3d.io.write_point_cloud(str(xyz_only), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz)))
    with pytest.raises(InvalidInputError, match="plain.xyz: point_features asks for colors"):
        adapter.load(xyz_only)


@pytest.mark.parametrize("suffix", [".off", ".obj", ".stl", ".ply"])
def test_meshes_are_sampled_on_their_surface(tmp_path, suffix):
    mesh = o3d.geometry.TriangleMesh.create_box(width=2.0, height=1.0, depth=0.5)
    mesh.compute_triangle_normals()
    path = tmp_path / f"box{suffix}"
    assert o3d.io.write_triangle_mesh(str(path), mesh)
    adapter = create_adapter("point_cloud", num_points=128)
    points = adapter.load(path).numpy()
    assert points.shape == (512, 3)  # mesh_samples = 4 * num_points
    size = np.array([2.0, 1.0, 0.5])
    on_a_face = (np.isclose(points, 0, atol=1e-6) | np.isclose(points, size, atol=1e-6)).any(axis=1)
    assert on_a_face.all() and (points > -1e-6).all() and (points < size + 1e-6).all()
    assert np.array_equal(points, adapter.load(path).numpy())  # seeded: the same sample every time


def test_arrays_npy_npz_bytes_and_open3d_objects(tmp_path):
    xyz = random_cloud(100, extra=2)  # extra columns beyond xyz are dropped
    adapter = create_adapter("point_cloud", num_points=32)
    np.save(tmp_path / "a.npy", xyz)
    np.savez(tmp_path / "b.npz", points=xyz, labels=np.zeros(100))
    buffer = io.BytesIO()
    np.save(buffer, xyz)
    sources = [xyz, torch.from_numpy(xyz), tmp_path / "a.npy", tmp_path / "b.npz", buffer.getvalue(),
               o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[:, :3]))]
    for source in sources:
        loaded = adapter.load(source)
        assert loaded.shape == (100, 3) and np.allclose(loaded.numpy(), xyz[:, :3], atol=1e-6), type(source)
    ply = tmp_path / "c.ply"
    o3d.io.write_point_cloud(str(ply), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[:, :3])))
    assert np.allclose(adapter.load(ply.read_bytes()).numpy(), xyz[:, :3], atol=1e-6)
    with open(ply, "rb") as handle:
        assert np.allclose(adapter.load(handle).numpy(), xyz[:, :3], atol=1e-6)


# --- preprocessing, augmentation, projection -----------------------------------------------------------------------

def test_preprocess_samples_normalises_and_is_deterministic():
    adapter = create_adapter("point_cloud", num_points=64)
    raw = adapter.load(random_cloud(1000) * 3 + 10)
    sample = adapter.preprocess(raw)
    assert sample.shape == (64, 3) and sample.dtype == torch.float32
    assert 0.9 < sample.norm(dim=1).max() <= 1.0 + 1e-6  # the cloud was normalised before sampling
    assert torch.equal(sample, adapter.preprocess(raw))
    assert len({tuple(p) for p in sample.tolist()}) == 64


def test_huge_clouds_are_voxel_downsampled_first():
    adapter = create_adapter("point_cloud", num_points=64, max_points=2000)
    rng = np.random.default_rng(5)
    plane = np.concatenate([rng.uniform(-1, 1, (50000, 2)), np.zeros((50000, 1))], axis=1)
    thinned = adapter.voxel_downsample(torch.from_numpy(plane).float())
    assert 100 < thinned.shape[0] <= 2000
    assert adapter.preprocess(torch.from_numpy(plane).float()).shape == (64, 3)


@pytest.mark.parametrize("rotation", ["up", "so3", "none"])
def test_augmentation_moves_points_as_a_rigid_body_plus_scale(rotation):
    adapter = create_adapter("point_cloud", num_points=50, rotation=rotation, scale_range=None, translate=0.0,
                             jitter_sigma=0.0)
    sample = adapter.preprocess(torch.from_numpy(random_cloud(200)).float())
    moved = adapter.augment(sample)
    # rotations keep every pairwise distance
    exact = "donot_use_mm_for_euclid_dist"
    distances_before = torch.cdist(sample, sample, compute_mode=exact)
    assert torch.allclose(torch.cdist(moved, moved, compute_mode=exact), distances_before, atol=1e-5)
    if rotation == "up":
        assert torch.allclose(moved[:, 1], sample[:, 1], atol=1e-6)  # heights (y) unchanged
    if rotation == "none":
        assert torch.equal(moved, sample)
    jittered = create_adapter("point_cloud", num_points=50, rotation="none", scale_range=None, translate=0.0,
                              jitter_sigma=0.5, jitter_clip=0.05).augment(sample)
    assert (jittered - sample).abs().max() <= 0.05 + 1e-6


def test_gradients_flow_through_p2p():
    adapter = create_adapter("point_cloud", num_points=128, image_size=56, num_views=3)
    batch = torch.randn(2, 128, 3, requires_grad=True)
    maps = adapter(batch)
    assert maps.shape == (6, 3, 56, 56) and torch.isfinite(maps).all()
    # sigmoid then ImageNet normalisation bounds every channel
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert (maps >= (-mean / std).view(1, 3, 1, 1) - 1e-5).all() and (maps <= ((1 - mean) / std).view(1, 3, 1, 1)
                                                                       + 1e-5).all()
    (maps * torch.randn_like(maps)).sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0
    for name, parameter in adapter.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_views_of_one_cloud_are_consecutive_maps():
    adapter = create_adapter("point_cloud", projection="depth", num_points=64, image_size=32, num_views=2)
    clouds = torch.stack([adapter.preprocess(torch.from_numpy(random_cloud(100, seed=s)).float()) for s in (1, 2)])
    together = adapter(clouds)
    assert torch.equal(together[2:], adapter(clouds[1:]))
    maps, context = adapter.encode(clouds)
    assert torch.equal(maps, together) and context["maps_per_sample"] == 2 == adapter.maps_per_sample


@pytest.mark.parametrize("projection", ["p2p", "depth"])
def test_files_through_the_adapter_into_the_backbone(tmp_path, projection):
    mesh = o3d.geometry.TriangleMesh.create_torus()
    path = tmp_path / "torus.obj"
    o3d.io.write_triangle_mesh(str(path), mesh)
    adapter = create_adapter("point_cloud", projection=projection, num_points=128, image_size=64)
    rebuilt = create_adapter("point_cloud", **adapter.config)
    assert rebuilt.config == adapter.config
    batch = adapter.collate([adapter.prepare(path), adapter.prepare(path, train=True)])
    model = timm.create_model("unireplknet_a", in_chans=adapter.out_channels, num_classes=0).eval()
    with torch.no_grad():
        features = model(adapter(batch))
    assert features.shape == (2 * 4, model.num_features) and torch.isfinite(features).all()


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("junk.off", b"garbage garbage\n" * 5, r"not a readable \.off file"),
    ("junk.npy", b"\x93NUMPY garbage", "not a readable .npy/.npz array"),
    ("points.las", b"LASF....", "unsupported point-cloud format .las"),
])
def test_more_bad_files(tmp_path, name, content, message):
    # missing, empty and corrupt PLY files are in test_modalities_with_backbone.py with the other modalities
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as info:
        create_adapter("point_cloud").load(path)
    assert str(path) in str(info.value)


def test_truncated_binary_ply(tmp_path):
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(random_cloud(1000)))
    path = tmp_path / "cut.ply"
    o3d.io.write_point_cloud(str(path), cloud, write_ascii=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=r"cut.ply: not a readable \.ply file \(open3d: .*failed") as info:
        create_adapter("point_cloud").load(path)
    assert "\x1b" not in str(info.value)  # terminal colour codes are stripped


@pytest.mark.parametrize("suffix", [".off", ".obj", ".ply"])
def test_truncated_meshes(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    o3d.io.write_triangle_mesh(str(path), o3d.geometry.TriangleMesh.create_torus())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=f"cut\\{suffix}: not a readable \\{suffix} file"):
        create_adapter("point_cloud").load(path)


@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 3)), "no points"),
    (np.zeros((10, 2)), r"expected points \(N, 3\)"),
    (np.zeros((2, 10, 3)), r"expected points \(N, 3\)"),
    (np.array([[0.0, 0, 0], [np.nan, 1, 1]]), "point 1 holds NaN"),
    (np.array([[0.0, 0, 0], [np.inf, 1, 1]]), "point 1 holds NaN or infinite"),
    (np.ones((20, 3)), "all 20 points coincide"),
    (np.array([["a", "b", "c"]]), "points must be numbers"),
])
def test_bad_arrays(array, message):
    with pytest.raises(InvalidInputError, match=message):
        create_adapter("point_cloud").load(array)


def test_bad_batches_and_configs():
    adapter = create_adapter("point_cloud", num_points=16, image_size=32)
    with pytest.raises(InvalidInputError, match=r"expected a batch of points \(B, P, 3\)"):
        adapter(torch.zeros(2, 16, 4))
    with pytest.raises(InvalidInputError, match="floating-point"):
        adapter(torch.zeros(2, 16, 3, dtype=torch.long))
    for bad in (dict(projection="voxels"), dict(point_features=["intensity"]), dict(image_size=16),
                dict(rotation="random"), dict(up_axis="w"), dict(fit="tight"), dict(scale_range=[2, 1]),
                dict(num_points=100, max_points=50)):
        with pytest.raises(InvalidInputError):
            create_adapter("point_cloud", **bad)
    with pytest.raises(InvalidInputError, match="cannot tell the format"):
        adapter.load(b"\x00\x01 unknown bytes")


def test_small_clouds_are_repeated_to_num_points():
    adapter = create_adapter("point_cloud", num_points=64)
    sample = adapter.preprocess(adapter.load(random_cloud(10)))
    assert sample.shape == (64, 3)
    assert len({tuple(p) for p in sample.tolist()}) == 10
    assert math.isclose(sample.norm(dim=1).max().item(), 1.0, abs_tol=1e-6)


def test_geometry_stays_in_full_precision_under_bfloat16_autocast():
    clouds = torch.randn(2, 512, 3)
    clouds = clouds / clouds.norm(dim=-1, keepdim=True)
    reference = project_points(clouds, 4, 224)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, cols, _ = project_points(clouds, 4, 224)
        neighbours = knn_indices(clouds, clouds, 16)
        depth = create_adapter("point_cloud", projection="depth", num_points=512)(clouds)
    assert torch.equal(rows, reference[0]) and torch.equal(cols, reference[1])
    assert torch.equal(neighbours, knn_indices(clouds, clouds, 16))
    assert torch.equal(depth, create_adapter("point_cloud", projection="depth", num_points=512)(clouds))
    # a bfloat16 batch is projected from full-precision coordinates too
    low = clouds.bfloat16()
    assert torch.equal(project_points(low, 4, 224)[0], project_points(low.float(), 4, 224)[0])


def test_p2p_views_of_one_cloud_do_not_depend_on_another_cloud():
    torch.manual_seed(0)
    adapter = create_adapter("point_cloud", num_points=64, image_size=32, num_views=3).eval()
    clouds = torch.stack([adapter.preprocess(torch.randn(100, 3)) for _ in range(3)])
    with torch.no_grad():
        together = adapter(clouds)
        alone = adapter(clouds[1:2])
    assert torch.allclose(together[3:6], alone, atol=1e-5)


def test_augmented_normals_follow_the_rotation_and_inverse_scale():
    torch.manual_seed(3)
    adapter = create_adapter("point_cloud", num_points=32, point_features=["normals"], rotation="so3",
                             translate=0.0, jitter_sigma=0.0)
    # points on the plane x + 2y + 3z = 0 with its normal: the transformed normal must stay perpendicular to it
    basis = torch.tensor([[2.0, -1.0, 0.0], [3.0, 0.0, -1.0]])
    xyz = torch.randn(32, 2) @ basis
    normal = torch.tensor([1.0, 2.0, 3.0]) / math.sqrt(14)
    sample = torch.cat([xyz, normal.expand(32, 3)], dim=1)
    moved = adapter.augment(sample)
    in_plane = moved[1:, :3] - moved[:1, :3]
    assert (in_plane @ moved[0, 3:]).abs().max() < 1e-4  # still the plane's normal after rotation and scale
    assert torch.allclose(moved[:, 3:].norm(dim=1), torch.ones(32), atol=1e-5)


def test_duplicate_points_do_not_skew_sampling():
    distinct = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    copies = distinct.repeat(100, 1)
    picked = farthest_point_sample(copies, 64)
    positions = [tuple(p) for p in copies[picked].tolist()]
    counts = sorted(positions.count(tuple(p)) for p in distinct.tolist())
    assert counts == [12, 13, 13, 13, 13]  # each distinct point taken equally often


def test_outliers_do_not_collapse_voxel_thinning():
    rng = np.random.default_rng(0)
    cube = np.concatenate([rng.uniform(0, 1, (20000, 3)), [[1000.0, 0.0, 0.0]]])
    adapter = create_adapter("point_cloud", num_points=64, max_points=2000)
    thinned = adapter.voxel_downsample(torch.from_numpy(cube))
    assert thinned.shape[0] >= 500
    assert len({tuple(p) for p in adapter.preprocess(torch.from_numpy(cube)).tolist()}) == 64


def test_georeferenced_coordinates_keep_their_precision():
    rng = np.random.default_rng(1)
    local = rng.uniform(0, 10, (2000, 3))
    utm = local + np.array([500000.0, 5400000.0, 300.0])
    adapter = create_adapter("point_cloud", num_points=256)
    assert torch.allclose(adapter.preprocess(adapter.load(utm)), adapter.preprocess(adapter.load(local)), atol=1e-5)


def test_forward_rejects_non_finite_points_and_accepts_other_float_dtypes():
    adapter = create_adapter("point_cloud", num_points=16, image_size=32)
    with pytest.raises(InvalidInputError, match="NaN or infinite coordinates"):
        adapter(torch.full((1, 16, 3), float("nan")))
    points = torch.randn(1, 16, 3, dtype=torch.float64)
    assert adapter(points).dtype == torch.float32
    assert torch.allclose(adapter(points), adapter(points.float()), atol=1e-5)


def test_text_file_objects_and_bad_faces(tmp_path):
    path = tmp_path / "points.xyz"
    o3d.io.write_point_cloud(str(path), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(random_cloud(50))))
    with open(path) as handle:  # text mode: a name with a suffix says the format
        assert create_adapter("point_cloud").load(handle).shape == (50, 3)
    broken = tmp_path / "bad_face.off"
    broken.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7000000\n")
    with pytest.raises(InvalidInputError, match=r"bad_face.off: face 0 refers to vertex \[0, 1, 7000000\], but the "
                                                r"mesh has 3 vertices"):
        create_adapter("point_cloud").load(broken)


def test_concurrent_loads_keep_stdout_and_stderr(tmp_path, capfd):
    from concurrent.futures import ThreadPoolExecutor

    paths = []
    for i in range(16):
        path = tmp_path / f"c{i}.ply"
        o3d.io.write_point_cloud(str(path), o3d.geometry.PointCloud(o3d.utility.Vector3dVector(random_cloud(200, i))))
        paths.append(path)
    adapter = create_adapter("point_cloud")
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(adapter.load, paths))
    assert all(points.shape == (200, 3) for points in loaded)
    os.write(1, b"stdout after loading\n")
    os.write(2, b"stderr after loading\n")
    out, err = capfd.readouterr()
    assert "stdout after loading" in out and "stderr after loading" in err
