"""``flare data prepare`` / ``inspect``: real 300W, WFLW and COFW samples, determinism
(re-runs and Ray vs local), bad inputs through the CLI, atomic writes, and ``flare data inspect``.

Expected values come from the files themselves (globbed pairs, .pts / list / csv parsed here) or are
derived by hand. The 300W prepare (2,566 faces, ~50 s) runs once per module.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from flare.datasets.prepare import PrepareOptions, prepare
from flare.datasets.synthetic import write_synthetic_folder
from flare.platform.cli import app

W300_TRAIN = {"afw": "afw", "helen/trainset": "helen", "lfpw/trainset": "lfpw"}
W300_TEST = {"helen/testset": "helen", "lfpw/testset": "lfpw"}
FLARE = Path(sys.executable).with_name("flare")
FACE_SUFFIX = re.compile(r"_\d{1,2}$")


# ------------------------------------------------------------------------------------------------
# helpers (independent of the code under test)
# ------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(directory: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(directory.iterdir())}


def pairs(folder: Path) -> list[Path]:
    """The .pts files of ``folder`` that have an image next to them."""
    return [p for p in sorted(folder.glob("*.pts")) if any(p.with_suffix(e).is_file() for e in (".jpg", ".png"))]


def plain_pts(path: Path) -> np.ndarray:
    """The (x, y) lines between '{' and '}', 1-based as written."""
    lines = [s.strip() for s in path.read_text().splitlines()]
    body = lines[lines.index("{") + 1 : lines.index("}")]
    return np.array([[float(v) for v in s.split()] for s in body])


def to_source(row: dict) -> np.ndarray:
    """Crop landmarks of a row mapped back through its crop -> source matrix."""
    m = np.asarray(row["matrix"], np.float64).reshape(3, 3)
    p = np.asarray(row["landmarks"], np.float64).reshape(-1, 2)
    return p @ m[:2, :2].T + m[:2, 2]


def read_rows(out: Path, columns: list[str] | None = None) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return pq.read_table([out / s["path"] for s in manifest["shards"]], columns=columns).to_pylist()


def run_cli(*args: str) -> tuple[int, str, str]:
    """``flare`` in-process (Typer's runner): exit code, stdout, stderr."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


# ------------------------------------------------------------------------------------------------
# 300W (real data)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w300(test_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """All of 300W as the compact pack a GPU window carries (``--image-size 384 --jpeg-quality 75``, through
    the CLI); the default-size geometry is compared on the ``small_300w`` subset."""
    out = tmp_path_factory.mktemp("w300") / "ds"
    code, _, err = run_cli("data", "prepare", "--format", "300w", "--root", test_data / "300W", "--out", out,
                           "--no-ray", "--image-size", "384", "--jpeg-quality", "75")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = read_rows(out, ["sample_id", "split", "subsets", "source", "group", "landmarks", "matrix", "cov"])
    return out, manifest, rows


def test_300w_counts_equal_the_image_pts_pairs(test_data: Path, w300) -> None:
    _, manifest, rows = w300
    root = test_data / "300W"
    expect_train = Counter({sub: len(pairs(root / rel)) for rel, sub in W300_TRAIN.items()})
    expect_test = Counter({sub: len(pairs(root / rel)) for rel, sub in W300_TEST.items()})
    assert sum(expect_train.values()) == 2012 and sum(expect_test.values()) == 554  # README figures
    got = {s: Counter() for s in ("train", "val", "test")}
    for row in rows:
        got[row["split"]].update(row["subsets"])
    assert got["train"] + got["val"] == expect_train
    assert got["test"] == expect_test + Counter(common=554, full=554)
    counts = manifest["counts"]
    assert counts["train"]["all"] + counts["val"]["all"] == 2012 and counts["test"]["all"] == 554
    for split in ("train", "val", "test"):
        assert {k: v for k, v in counts[split].items() if k != "all"} == dict(got[split])
    assert manifest["layout"] == "300w68" and manifest["skipped"] == []
    assert len({r["sample_id"] for r in rows}) == len(rows) == 2566


def test_300w_validation_is_carved_from_train_by_photo(w300) -> None:
    rows = w300[2]

    def photo(source: str) -> str:  # 300W names faces of one photo <photo>_<k> (afw, helen)
        path = Path(source)
        return f"{path.parent}/{FACE_SUFFIX.sub('', path.stem)}"

    assert all(r["group"] == photo(r["source"]) for r in rows)
    by_split = {s: {photo(r["source"]) for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not by_split["train"] & by_split["val"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert val_rows and all(Path(r["source"]).parts[0] in ("afw", "helen", "lfpw") for r in val_rows)
    assert all("trainset" in r["source"] or r["source"].startswith("afw/") for r in val_rows)
    assert not any("common" in r["subsets"] for r in val_rows)
    photos = len(by_split["train"] | by_split["val"])
    assert abs(len(by_split["val"]) / photos - 0.1) < 0.01
    multi = Counter(photo(r["source"]) for r in rows if r["split"] in ("train", "val"))
    assert max(multi.values()) > 1  # the grouping is exercised (afw photos with several faces)


def test_300w_crop_landmarks_map_back_to_the_pts(test_data: Path, w300) -> None:
    _, _, rows = w300
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), size=20, replace=False):
        row = rows[int(i)]
        expected = plain_pts((test_data / "300W" / row["source"]).with_suffix(".pts")) - 1.0
        assert np.abs(to_source(row) - expected).max() < 0.01, row["source"]


def test_300w_rows_and_shard_digests(w300) -> None:
    out, manifest, rows = w300
    for shard in manifest["shards"]:
        path = out / shard["path"]
        assert sha256(path) == shard["sha256"]
        assert pq.ParquetFile(path).metadata.num_rows == shard["rows"]
        assert set(pq.read_table(path, columns=["split"]).column("split").to_pylist()) == {shard["split"]}
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)
    assert sorted(p.name for p in out.iterdir()) == sorted([s["path"] for s in manifest["shards"]] + ["manifest.json",
                                                                                               ".flare-output"])
    cov = np.asarray(rows[0]["cov"]).reshape(68, 2, 2)
    assert np.allclose(cov, cov.transpose(0, 2, 1)) and np.linalg.eigvalsh(cov).min() > 0


def test_300w_compact_pack_fits_40_mib_with_the_same_geometry(w300, small_300w: Path) -> None:
    """``--image-size 384 --jpeg-quality 75``: all of 300W (train, val, test) in at most 40 MiB (what a GPU
    window can carry), and its training crops agree with the default pack's (512 px, JPEG 95) on the same
    faces (the afw + lfpw test subset of ``small_300w``)."""
    from flare.datasets.ingest import BatchBuilder, load_manifest

    out, manifest, _ = w300
    size = sum(p.stat().st_size for p in out.iterdir())
    assert size <= 40 * 2**20, size
    assert (manifest["image_size"], manifest["canonical_size"], manifest["edge_size"]) == (384, 192, 96)
    assert manifest["options"]["jpeg_quality"] == 75
    default = json.loads((small_300w / "manifest.json").read_text())
    assert (default["image_size"], default["canonical_size"]) == (512, 256)
    rows = {r["sample_id"]: r for r in read_rows(out)}
    big = {r["sample_id"]: r for r in read_rows(small_300w)[::40]}
    assert len(big) >= 12 and set(big) <= set(rows)
    for sid, row in big.items():
        assert np.abs(to_source(rows[sid]) - to_source(row)).max() < 0.01
    ids = sorted(big)
    layout = load_manifest(out).layout
    a = BatchBuilder(layout, 256, augment=False)([rows[i] for i in ids])
    b = BatchBuilder(layout, 256, augment=False)([big[i] for i in ids])
    assert torch.allclose(a["landmarks_crop"], b["landmarks_crop"], atol=0.01)
    assert torch.allclose(a["to_original"], b["to_original"], atol=1e-6)
    diff = (a["image"] - b["image"]).abs().mean().item() * 127.5  # grey levels
    assert diff < 6.0, diff  # 192 px faces upsampled to 256 at JPEG 75 vs 256 px faces at JPEG 95
    assert (a["point_targets"] - b["point_targets"]).abs().max() < 1e-4
    assert (a["edge_targets"] - b["edge_targets"]).abs().mean() < 0.01


@pytest.mark.parametrize("option, value, message", [("--image-size", "100", "image_size must be a multiple of 8"),
                                                    ("--jpeg-quality", "0", "--jpeg-quality")])
def test_bad_pack_options_fail_with_one_line(good_root: Path, tmp_path: Path, option: str, value: str,
                                            message: str) -> None:
    code, _, err = run_cli("data", "prepare", "--format", "300w", "--root", good_root, "--out", tmp_path / "ds",
                           "--no-ray", option, value)
    assert code == 2 and message in err and not (tmp_path / "ds").exists()


# ------------------------------------------------------------------------------------------------
# WFLW and COFW samples (real data)
# ------------------------------------------------------------------------------------------------


def test_wflw_samples_prepare_with_98_points_and_attributes(test_data: Path, tmp_path: Path) -> None:
    root = test_data / "WFLW_samples"
    manifest = prepare("wflw", root, tmp_path / "ds", engine="local")
    lst = root / "WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt"
    lines = [ln.split() for ln in lst.read_text().splitlines() if ln.strip()]
    names = ("pose", "expression", "illumination", "makeup", "occlusion", "blur")
    expected, seen, subsets = {}, Counter(), Counter(all=len(lines))
    for tok in lines:  # 196 coordinates, 4 box values, 6 flags, image path
        source = f"WFLW_images/{tok[206]}"
        flags = [int(t) for t in tok[200:206]]
        expected[f"wflw:{source}#{seen[source]}"] = (np.array(tok[:196], float).reshape(98, 2), flags)
        seen[source] += 1
        subsets.update(name for name, f in zip(names, flags) if f)
    rows = read_rows(tmp_path / "ds")
    assert manifest["num_points"] == 98 and manifest["layout"] == "wflw98"
    assert manifest["counts"] == {"test": dict(subsets)} and len(rows) == len(lines) == 5
    for row in rows:
        pts, flags = expected[row["sample_id"]]
        assert len(row["landmarks"]) == 196 and len(row["cov"]) == 98 * 4
        assert np.abs(to_source(row) - pts).max() < 0.01
        assert json.loads(row["attributes"]) == dict(zip(names, flags))
        assert len(row["edges"]) == 9 * manifest["edge_size"] ** 2


def test_cofw_samples_prepare_with_29_points_and_occlusion(test_data: Path, tmp_path: Path) -> None:
    root = test_data / "COFW_samples"
    manifest = prepare("cofw_csv", root, tmp_path / "ds", engine="local")
    with (root / "cofw_samples.csv").open() as f:
        table = {r["image"]: r for r in csv.DictReader(f)}
    rows = read_rows(tmp_path / "ds")
    assert manifest["num_points"] == 29 and manifest["layout"] == "cofw29" and len(rows) == len(table) == 2
    occluded_total = 0
    for row in rows:
        src = table[row["source"]]
        pts = np.array([[float(src[f"x{k}"]), float(src[f"y{k}"])] for k in range(29)])
        occ = [int(float(src[f"occluded{k}"])) for k in range(29)]
        assert np.abs(to_source(row) - pts).max() < 0.01
        assert row["occlusion"] == occ
        occluded_total += sum(occ)
    assert occluded_total > 0  # 001805.jpg has a hand over one eye


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------


def test_two_prepares_with_the_same_seed_are_byte_identical(tmp_path: Path) -> None:
    opts = PrepareOptions(seed=3, val_fraction=0.2, rows_per_shard=8)
    for name in ("a", "b"):
        prepare("synthetic", Path("."), tmp_path / name, opts, engine="local", synthetic_count=20)
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(first) >= 5 and "manifest.json" in first  # 16 + 4 + 4 rows in shards of 8
    assert first == second


# ------------------------------------------------------------------------------------------------
# bad inputs, atomic writes (CLI)
# ------------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def _headed(points: np.ndarray, bad_line: int | None = None) -> str:
    rows = [f"{x:.3f} {y:.3f}" for x, y in points]
    if bad_line is not None:
        rows[bad_line - 4] = "12.5 1.2e.3"  # file line k holds point k - 4 (three header lines)
    return "version: 1\nn_points: {}\n{{\n{}\n}}\n".format(len(rows), "\n".join(rows))


def _header_only_jpeg() -> bytes:
    """A JPEG whose frame header is valid (80x64) but that has no scan: its size reads, it does not decode."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 64, 80, 3) + bytes([1, 0x11, 0, 2, 0x11, 1, 3, 0x11, 1])
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _bad_67(d: Path, good: Path) -> None:
    shutil.copy(good.with_suffix(".png"), d / "bad_67.png")
    _write(d / "bad_67.pts", _headed(plain_pts(good)[:67]))


def _bad_float(d: Path, good: Path) -> None:
    shutil.copy(good.with_suffix(".png"), d / "bad_float.png")
    _write(d / "bad_float.pts", _headed(plain_pts(good), bad_line=12))


def _bad_noimage(d: Path, good: Path) -> None:
    shutil.copy(good, d / "bad_noimage.pts")


def _bad_corrupt(d: Path, good: Path) -> None:
    shutil.copy(good, d / "bad_corrupt.pts")
    _write(d / "bad_corrupt.jpg", b"this is not an image\n" * 50)


def _bad_far(d: Path, good: Path) -> None:
    pts = plain_pts(good)
    pts[30, 0] += 10_000.0
    shutil.copy(good.with_suffix(".png"), d / "bad_far.png")
    _write(d / "bad_far.pts", _headed(pts))


def _bad_undecodable(d: Path, good: Path) -> None:
    pts = plain_pts(good) * 0.25  # inside the 80x64 frame the header announces
    _write(d / "bad_undecodable.pts", _headed(pts))
    _write(d / "bad_undecodable.jpg", _header_only_jpeg())


BAD = {  # maker, fragment of the one-line message
    "bad_67": (_bad_67, "bad_67.pts:71: expected 68 points, found 67"),
    "bad_float": (_bad_float, "bad_float.pts:12: cannot parse"),
    "bad_noimage": (_bad_noimage, "bad_noimage.pts: no image"),
    "bad_corrupt": (_bad_corrupt, "bad_corrupt.jpg: corrupt or unsupported image"),
    "bad_far": (_bad_far, "bad_far.pts: landmark 30 at"),
    "bad_undecodable": (_bad_undecodable, "bad_undecodable.jpg: corrupt or unsupported image"),
}


@pytest.fixture(scope="module")
def good_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300W-layout folder of 4 synthetic faces (3 in synthetic/trainset, 1 in synthetic/testset)."""
    root = tmp_path_factory.mktemp("good")
    write_synthetic_folder(root, 4, size=160, seed=2)
    return root


def _root_with(good_root: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(good_root, dst)
    train = dst / "synthetic" / "trainset"
    good = min(train.glob("*.pts"))
    for name in names:
        BAD[name][0](train, good)
    return dst


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_fails_with_one_line_and_leaves_nothing(good_root: Path, tmp_path: Path, name: str) -> None:
    root = _root_with(good_root, tmp_path / "root", name)
    parent = tmp_path / "outputs"
    parent.mkdir()
    code, _, err = run_cli("data", "prepare", "--format", "300w", "--root", root, "--out", parent / "ds",
                           "--no-ray", "--on-error", "fail")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert BAD[name][1] in lines[0]
    assert list(parent.iterdir()) == []


def test_bad_input_through_a_real_subprocess(good_root: Path, tmp_path: Path) -> None:
    """The process-time failure (image header fine, pixels not) after the temporary directory exists."""
    root = _root_with(good_root, tmp_path / "root", "bad_undecodable")
    parent = tmp_path / "outputs"
    parent.mkdir()
    proc = subprocess.run(
        [str(FLARE), "data", "prepare", "--format", "300w", "--root", str(root), "--out", str(parent / "ds"),
         "--no-ray", "--on-error", "fail"],
        check=False, capture_output=True, text=True, env=dict(os.environ), timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad_undecodable.jpg" in lines[0]
    assert list(parent.iterdir()) == []


def test_skip_writes_the_dataset_and_lists_every_skip(good_root: Path, tmp_path: Path) -> None:
    root = _root_with(good_root, tmp_path / "root", *BAD)
    out = tmp_path / "ds"
    code, stdout, err = run_cli("data", "prepare", "--format", "300w", "--root", root, "--out", out, "--no-ray",
                                "--on-error", "skip", "--val-fraction", "0")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = manifest["skipped"]
    assert len(skipped) == len(BAD) and f"skipped {len(BAD)} items" in stdout
    for name, (_, fragment) in BAD.items():
        hits = [s for s in skipped if name + "." in s["item"] + " " + s["reason"]]
        assert len(hits) == 1, name
        assert fragment.split(": ", 1)[1] in hits[0]["reason"]
    assert manifest["counts"]["train"]["all"] == 3 and manifest["counts"]["test"]["all"] == 1
    ids = [r["sample_id"] for r in read_rows(out, ["sample_id"])]
    assert len(ids) == 4 and not any("bad_" in i for i in ids)
    assert leftovers(tmp_path, "ds") == []


def test_existing_dataset_is_refused_or_replaced_whole(good_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    base = ("data", "prepare", "--format", "300w", "--root", good_root, "--out", out, "--no-ray")
    assert run_cli(*base, "--val-fraction", "0")[0] == 0
    (out / "notes.txt").write_text("not part of a dataset")
    before = digests(out)
    code, _, err = run_cli(*base, "--val-fraction", "0")
    assert code == 2 and err.startswith("error: ") and "already exists" in err
    assert digests(out) == before

    code, _, err = run_cli(*base, "--val-fraction", "0.5", "--overwrite")
    assert code == 0, err
    after = digests(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "notes.txt" not in after and after != before
    assert manifest["counts"]["val"]["all"] >= 1 and manifest["options"]["val_fraction"] == 0.5
    assert set(after) == {s["path"] for s in manifest["shards"]} | {"manifest.json", ".flare-output"}
    assert json.loads((out / ".flare-output").read_text()) == {"written_by": "flare data prepare"}
    assert all(after[s["path"]] == s["sha256"] for s in manifest["shards"])
    assert leftovers(tmp_path, "ds") == []

    bad_root = _root_with(good_root, tmp_path / "bad_root", "bad_undecodable")  # fails mid-write
    code, _, err = run_cli("data", "prepare", "--format", "300w", "--root", bad_root, "--out", out, "--no-ray",
                           "--overwrite")
    assert code == 2 and "bad_undecodable.jpg" in err
    assert digests(out) == after and leftovers(tmp_path, "ds") == []


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------


def test_inspect_prints_counts_and_writes_the_grid(good_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare("300w", good_root, out, PrepareOptions(val_fraction=0.0), engine="local")
    png = tmp_path / "grid.png"
    code, stdout, err = run_cli("data", "inspect", out, "--png", png, "--n", "3")
    assert code == 0, err
    *body, last = stdout.strip().splitlines()
    assert last == f"grid: {png}"
    printed = json.loads("\n".join(body))
    splits = Counter(r["split"] for r in read_rows(out, ["split"]))
    assert {s: c["all"] for s, c in printed["counts"].items()} == dict(splits) == {"train": 3, "test": 1}
    grid = cv2.imread(str(png))
    assert grid.shape == (2 * 256, 2 * 256, 3)  # 3 tiles of 256 px: ceil(sqrt 3) = 2 columns, 2 rows
    tiles = [grid[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] for r in range(2) for c in range(2)]
    assert all(t.mean() > 10 for t in tiles[:3]) and tiles[3].max() == 0
    green = (tiles[0][..., 1].astype(int) - tiles[0][..., 2]) > 150  # landmarks drawn in green
    assert green.sum() > 50


# ------------------------------------------------------------------------------------------------
# Ray Data engine (a real local Ray: the session fixture ``ray_cluster`` of conftest.py)
# ------------------------------------------------------------------------------------------------


def test_ray_and_local_engines_write_identical_shards(ray_cluster, tmp_path: Path) -> None:
    opts = PrepareOptions(seed=1, val_fraction=0.2)
    local = prepare("synthetic", Path("."), tmp_path / "local", opts, engine="local", synthetic_count=25)
    prepare("synthetic", Path("."), tmp_path / "ray", opts, engine="ray", synthetic_count=25)
    assert sum(s["rows"] for s in local["shards"]) == 30
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
