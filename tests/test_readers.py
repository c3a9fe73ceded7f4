"""Readers for the original formats (method.md 11) and the crop rule (8.1).

Real-data tests read $FLARE_TEST_DATA (the folder holding 300W/, WFLW_samples/, COFW_samples/);
fixture tests build their own files and always run.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from scipy.io import savemat

from flare.datasets.readers import (
    clean_legacy_path,
    parse_pts,
    read_300w,
    read_adnet,
    read_cofw,
    read_cofw_csv,
    read_dataset,
    read_wflw,
)
from flare.datasets.records import DataError, FaceRecord, FileImage, crop_center_scale

W300_FOLDERS = {"afw": 337, "helen/trainset": 870, "helen/testset": 330, "lfpw/trainset": 805, "lfpw/testset": 224}


@pytest.fixture(scope="module")
def data_root() -> Path:
    value = os.environ.get("FLARE_TEST_DATA")
    if not value:
        pytest.skip("FLARE_TEST_DATA not set (point it at the folder with 300W/, WFLW_samples/, COFW_samples/)")
    return Path(value)


@pytest.fixture(scope="module")
def w300(data_root):
    return read_300w(data_root / "300W")


def _plain_pts(path: Path) -> np.ndarray:
    """Independent reference: the lines between '{' and '}'."""
    lines = path.read_text().split("\n")
    body = lines[lines.index("{") + 1 : lines.index("}")]
    return np.array([[float(v) for v in ln.split()] for ln in body])


# ------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------


def test_300w_counts_per_folder_match_the_files(data_root, w300):
    records, skipped = w300
    assert skipped == []
    for folder, expected in W300_FOLDERS.items():
        d = data_root / "300W" / folder
        pairs = [p for p in d.glob("*.jpg") if p.with_suffix(".pts").is_file()]
        got = [r for r in records if r.source.rsplit("/", 1)[0] == folder]
        assert len(got) == len(pairs) == expected, folder
    assert len(records) == 2566
    assert len({r.sample_id for r in records}) == 2566


def test_300w_splits_and_subsets(w300):
    records = w300.records
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    assert len(train) == 337 + 870 + 805 and len(test) == 330 + 224
    assert all(r.source.startswith(("afw/", "helen/trainset/", "lfpw/trainset/")) for r in train)
    assert all("common" in r.subsets and "challenge" not in r.subsets for r in test)
    assert not any("common" in r.subsets for r in train)
    assert all(r.dataset == "300w" and r.landmarks.shape == (68, 2) for r in records)


def test_300w_landmarks_are_pts_minus_one(data_root, w300):
    records = w300.records
    first = min((data_root / "300W" / "afw").glob("*.pts"))
    assert records[0].source == "afw/" + first.with_suffix(".jpg").name
    assert np.array_equal(records[0].landmarks[0], _plain_pts(first)[0] - 1.0)
    rng = np.random.default_rng(0)
    for k in rng.choice(len(records), 15, replace=False):
        rec = records[k]
        ref = _plain_pts((data_root / "300W" / rec.source).with_suffix(".pts")) - 1.0
        np.testing.assert_array_equal(rec.landmarks, ref)
        np.testing.assert_array_equal(rec.box, [*ref.min(0), *ref.max(0)])


def test_300w_groups_keep_faces_of_one_photo_together(w300):
    by_source = {r.source: r for r in w300.records}
    assert by_source["afw/111076519_1.jpg"].group == by_source["afw/111076519_2.jpg"].group
    assert by_source["afw/111076519_1.jpg"].group != by_source["afw/1051618982_1.jpg"].group
    lfpw = [r.group for r in w300.records if r.source.startswith("lfpw/trainset/")]
    assert len(set(lfpw)) == len(lfpw)  # image_0001 etc. are distinct photos


def test_300w_grey_image_loads_as_three_equal_channels(data_root, w300):
    for rec in w300.records:
        if rec.source.startswith("lfpw/trainset/"):
            raw = cv2.imread(str(data_root / "300W" / rec.source), cv2.IMREAD_UNCHANGED)
            if raw.ndim == 2:
                img = rec.load_image()
                assert img.shape == (*raw.shape, 3) and img.dtype == np.uint8
                assert np.array_equal(img[..., 0], raw) and np.array_equal(img[..., 2], raw)
                assert rec.image_size == (raw.shape[1], raw.shape[0])
                return
    pytest.fail("no grey image found in lfpw/trainset (the README lists 27)")


def test_wflw_samples(data_root):
    root = data_root / "WFLW_samples"
    records, skipped = read_wflw(root)
    list_path = root / "WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_test.txt"
    lines = [ln.split() for ln in list_path.read_text().splitlines() if ln.strip()]
    assert len(records) == len(lines) == 5 and skipped == []
    assert len({r.group for r in records}) == 3
    assert len({r.sample_id for r in records}) == 5
    names = ["pose", "expression", "illumination", "makeup", "occlusion", "blur"]
    for rec, tok in zip(records, lines):
        assert rec.landmarks.shape == (98, 2) and rec.split == "test" and rec.dataset == "wflw"
        np.testing.assert_array_equal(rec.landmarks[:, 0], [float(v) for v in tok[0:196:2]])
        np.testing.assert_array_equal(rec.landmarks[:, 1], [float(v) for v in tok[1:196:2]])
        np.testing.assert_array_equal(rec.box, [float(v) for v in tok[196:200]])
        assert rec.attributes == {n: int(v) for n, v in zip(names, tok[200:206])}
        assert rec.source == "WFLW_images/" + tok[206]
    assert records[0].attributes["illumination"] == 1 and records[0].subsets == ("illumination",)
    assert records[1].subsets == ()
    img = records[2].load_image()
    assert img.shape == (1024, 1024, 3)
    with pytest.raises(DataError, match="list_98pt_rect_attr_train.txt"):
        read_wflw(root, split="train")


def test_cofw_samples_csv(data_root):
    root = data_root / "COFW_samples"
    records, skipped = read_cofw_csv(root)
    rows = list(csv.DictReader((root / "cofw_samples.csv").open()))
    assert len(records) == len(rows) == 2 and skipped == []
    for rec, row in zip(records, rows):
        assert rec.landmarks.shape == (29, 2) and rec.split == "test"
        np.testing.assert_array_equal(rec.landmarks[:, 0], [float(row[f"x{k}"]) for k in range(29)])
        np.testing.assert_array_equal(rec.landmarks[:, 1], [float(row[f"y{k}"]) for k in range(29)])
        np.testing.assert_array_equal(rec.occlusion, [int(row[f"occluded{k}"]) for k in range(29)])
        np.testing.assert_array_equal(rec.box, [float(row[c]) for c in ("x_min", "y_min", "x_max", "y_max")])
    r1805 = next(r for r in records if r.source == "001805.jpg")
    assert r1805.occlusion.dtype == np.uint8 and r1805.occlusion.sum() == 9
    assert r1805.occlusion[0] == 1 and r1805.occlusion[1] == 0
    assert r1805.load_image().shape[2] == 3


# ------------------------------------------------------------------------------------------------
# COFW .mat fixtures (v7.3 via HDF5, classic via scipy)
# ------------------------------------------------------------------------------------------------


def _cofw_arrays(rng):
    """Three faces: two RGB images of different sizes and one grey; 1-based phis (M, 87)."""
    shapes = [(40, 50, 3), (36, 30, 3), (32, 44)]
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    phis = np.zeros((3, 87))
    for i, s in enumerate(shapes):
        phis[i, :29] = rng.uniform(1, s[1], 29)
        phis[i, 29:58] = rng.uniform(1, s[0], 29)
        phis[i, 58:] = rng.integers(0, 2, 29)
    bboxes = np.array([[3.0, 4.0, 20.0, 25.0], [2.0, 2.0, 10.0, 12.0], [5.0, 6.0, 30.0, 20.0]])
    return images, phis, bboxes


def _write_cofw_h5(path: Path, images, phis, bboxes) -> None:
    """MATLAB v7.3 layout: every array stored transposed, the cell array as object references."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_dataset("IsT", (len(images), 1), dtype=h5py.ref_dtype)
        grp = f.create_group("#refs#")
        for i, img in enumerate(images):
            refs[i, 0] = grp.create_dataset(f"im{i}", data=img.T).ref  # H×W×3 -> 3×W×H
        f.create_dataset("phisT", data=phis.T)  # 87×M
        f.create_dataset("bboxesT", data=bboxes.T)  # 4×M
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, written by the flare test suite")


def _check_cofw(records, images, phis, bboxes, offset=1.0):
    assert len(records) == 3
    for i, rec in enumerate(records):
        assert rec.dataset == "cofw" and rec.split == "test" and rec.source.endswith(f"#{i}")
        np.testing.assert_allclose(rec.landmarks[:, 0], phis[i, :29] - offset)
        np.testing.assert_allclose(rec.landmarks[:, 1], phis[i, 29:58] - offset)
        np.testing.assert_array_equal(rec.occlusion, phis[i, 58:].astype(np.uint8))
        x, y, w, h = bboxes[i]
        np.testing.assert_allclose(rec.box, [x - offset, y - offset, x - offset + w, y - offset + h])
        img = rec.load_image()
        raw = images[i]
        if raw.ndim == 3:
            assert np.array_equal(img, raw[:, :, ::-1])  # RGB -> BGR
        else:
            assert np.array_equal(img, np.repeat(raw[:, :, None], 3, axis=2))
    assert len({r.sample_id for r in records}) == 3


def test_cofw_v73_mat(tmp_path):
    images, phis, bboxes = _cofw_arrays(np.random.default_rng(1))
    _write_cofw_h5(tmp_path / "COFW_test_color.mat", images, phis, bboxes)
    records, skipped = read_cofw(tmp_path)
    assert skipped == []
    _check_cofw(records, images, phis, bboxes)
    _check_cofw(read_cofw(tmp_path, one_based=False).records, images, phis, bboxes, offset=0.0)
    rec = pickle.loads(pickle.dumps(records[0]))
    assert np.array_equal(rec.load_image(), images[0][:, :, ::-1])
    with pytest.raises(DataError, match="COFW_train_color.mat"):
        read_cofw(tmp_path, split="train")


def test_cofw_classic_mat(tmp_path):
    images, phis, bboxes = _cofw_arrays(np.random.default_rng(2))
    cell = np.empty((1, 3), dtype=object)
    for i, img in enumerate(images):
        cell[0, i] = img
    savemat(tmp_path / "COFW_test.mat", {"IsT": cell, "phisT": phis, "bboxesT": bboxes})
    _check_cofw(read_cofw(tmp_path).records, images, phis, bboxes)


# ------------------------------------------------------------------------------------------------
# ADNet/STAR metadata
# ------------------------------------------------------------------------------------------------


def _img(path: Path, w: int = 60, h: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def _tsv_row(path: str, pts: np.ndarray, scale: float, cx: float, cy: float, tags: str | None = None) -> str:
    cols = [path, ",".join(["1.5"] * 10), ",".join(f"{v:.3f}" for v in pts.ravel()), str(scale), str(cx), str(cy)]
    return "\t".join(cols + ([tags] if tags is not None else []))


def test_adnet_tsv_with_and_without_header(tmp_path):
    _img(tmp_path / "300W/afw/111_1.jpg")
    _img(tmp_path / "300W/helen/testset/222_1.jpg")
    rng = np.random.default_rng(3)
    p1, p2 = rng.uniform(5, 45, (68, 2)), rng.uniform(5, 45, (68, 2))
    rows = [
        _tsv_row("\\\\msra-share\\data\\wflw\\rawImages\\afw\\111_1.jpg", p1, 0.25, 30.0, 24.5),
        _tsv_row("./rawImages/helen/testset/222_1.jpg", p2, 0.3, 31.0, 20.0),
    ]
    header = "image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h\ttag"
    (tmp_path / "with").mkdir()
    (tmp_path / "with/test.tsv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "test.tsv").write_text("\r\n".join(rows) + "\r\n")
    for tsv in (tmp_path / "with/test.tsv", tmp_path / "test.tsv"):
        records, skipped = read_adnet(tmp_path, tsv)
        assert len(records) == 2 and skipped == []
        a, b = records
        assert a.source == "300W/afw/111_1.jpg" and b.source == "300W/helen/testset/222_1.jpg"
        np.testing.assert_allclose(a.landmarks, np.round(p1, 3))
        np.testing.assert_allclose(a.center, [30.0, 24.5])
        assert a.scale == 0.25 and a.split == "test" and a.dataset == "300w"
        assert "common" in b.subsets and "common" not in a.subsets
        assert crop_center_scale(a)[1] == 0.25  # metadata wins
    assert len(read_dataset("adnet", tmp_path, split="test").records) == 2  # <root>/test.tsv


def test_adnet_wflw_tags(tmp_path):
    _img(tmp_path / "WFLW/WFLW_images/1--Event/a.jpg", 120, 100)
    pts = np.random.default_rng(4).uniform(10, 90, (98, 2))
    row = _tsv_row("\\\\share\\wflw\\rawImages\\1--Event\\a.jpg", pts, 0.4, 50, 50, "1,0,0,1,0,1")
    (tmp_path / "train.tsv").write_text(row + "\n")
    (rec,), _ = read_adnet(tmp_path, tmp_path / "train.tsv")
    assert rec.dataset == "wflw" and rec.split == "train" and rec.landmarks.shape == (98, 2)
    assert rec.attributes == {"pose": 1, "expression": 0, "illumination": 0, "makeup": 1, "occlusion": 0,
                              "blur": 1}
    assert rec.subsets == ("pose", "makeup", "blur")


def test_clean_legacy_path():
    assert clean_legacy_path("\\\\msra-facednn03\\x\\wflw\\rawImages\\51--D\\a.jpg") == "51--D/a.jpg"
    assert clean_legacy_path("./rawImages/afw/1.jpg") == "afw/1.jpg"
    assert clean_legacy_path("helen\\testset\\2.jpg") == "helen/testset/2.jpg"


# ------------------------------------------------------------------------------------------------
# .pts forms and bad inputs
# ------------------------------------------------------------------------------------------------


def _pts_text(pts: np.ndarray, header: bool = True, newline: str = "\n") -> str:
    body = [f"{x:.3f} {y:.3f}" for x, y in pts]
    lines = ["version: 1", f"n_points:  {len(pts)}", "{", *body, "}"] if header else body
    return newline.join(lines) + newline


def _face_folder(root: Path, name: str, pts: np.ndarray, image: bool = True, **kw) -> Path:
    folder = root / "afw"
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        _img(folder / f"{name}.jpg", 100, 100)
    path = folder / f"{name}.pts"
    path.write_text(_pts_text(pts, **kw))
    return path


def test_pts_forms(tmp_path):
    pts = np.random.default_rng(5).uniform(1, 99, (68, 2)).round(3)
    headed = tmp_path / "a.pts"
    headed.write_text(_pts_text(pts))
    bare = tmp_path / "b.pts"
    bare.write_bytes(("\r\n" + _pts_text(pts, header=False, newline="\r\n\r\n")).encode())
    np.testing.assert_allclose(parse_pts(headed), pts - 1)
    np.testing.assert_allclose(parse_pts(bare), pts - 1)
    np.testing.assert_allclose(parse_pts(bare, one_based=False), pts)


def test_bad_pts_point_count(tmp_path):
    pts = np.full((67, 2), 50.0)
    path = _face_folder(tmp_path, "f67", pts)
    with pytest.raises(DataError) as err:
        read_300w(tmp_path)
    assert str(err.value) == f"{path}:{3 + 67 + 1}: expected 68 points, found 67"
    assert "\n" not in str(err.value)


def test_bad_pts_float_names_line(tmp_path):
    path = _face_folder(tmp_path, "bad", np.full((68, 2), 50.0))
    lines = path.read_text().split("\n")
    lines[3 + 9] = "50.0 5O.1"  # point 10 (file line 13) has a letter O
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        read_300w(tmp_path)
    assert err.value.path == str(path) and err.value.line == 13
    assert str(err.value).startswith(f"{path}:13: ") and "5O.1" in str(err.value)


def test_pts_without_image_and_far_outside(tmp_path):
    path = _face_folder(tmp_path, "noimg", np.full((68, 2), 50.0), image=False)
    with pytest.raises(DataError, match="no image for") as err:
        read_300w(tmp_path)
    assert err.value.path == str(path)
    path.unlink()
    far = np.full((68, 2), 50.0)
    far[7] = [50.0, 175.0]  # 1-based y = 175 on a 100-px image: 74 px below the border
    _face_folder(tmp_path, "far", far)
    with pytest.raises(DataError, match="landmark 7"):
        read_300w(tmp_path)


def test_corrupt_image(tmp_path):
    path = _face_folder(tmp_path, "corrupt", np.full((68, 2), 50.0))
    img = path.with_suffix(".jpg")
    img.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError) as err:
        read_300w(tmp_path)
    assert err.value.path == str(img)
    with pytest.raises(DataError, match="corrupt"):
        FileImage(str(img)).load()
    with pytest.raises(DataError) as err:
        FileImage(str(tmp_path / "missing.png")).load()
    assert "missing.png" in str(err.value)


def test_wflw_wrong_token_count(tmp_path):
    ann = tmp_path / "WFLW_annotations/list_98pt_rect_attr_train_test"
    ann.mkdir(parents=True)
    _img(tmp_path / "WFLW_images/e/a.jpg", 200, 200)
    good = " ".join(["50.0"] * 196 + ["10", "10", "90", "90", "0", "1", "0", "0", "0", "0", "e/a.jpg"])
    bad = " ".join(["50.0"] * 189 + ["10", "10", "90", "90", "0", "0", "0", "0", "0", "0", "e/a.jpg"])
    path = ann / "list_98pt_rect_attr_train.txt"
    path.write_text(f"{good}\n{bad}\n{good}\n")
    with pytest.raises(DataError) as err:
        read_wflw(tmp_path)
    assert str(err.value) == f"{path}:2: expected 207 tokens, found 200"
    records, skipped = read_wflw(tmp_path, on_error="skip")
    assert len(records) == 2 and skipped == [(f"{path}:2", "expected 207 tokens, found 200")]
    assert [r.sample_id.rsplit("#", 1)[1] for r in records] == ["0", "1"]
    assert records[0].split == "train" and records[0].subsets == ("expression",)


def test_skip_mode_collects_bad_faces(tmp_path):
    good = np.random.default_rng(6).uniform(10, 90, (68, 2)).round(3)
    _face_folder(tmp_path, "a_good", good)
    _face_folder(tmp_path, "b_short", good[:67])
    _face_folder(tmp_path, "c_noimg", good, image=False)
    corrupt = _face_folder(tmp_path, "d_corrupt", good).with_suffix(".jpg")
    corrupt.write_bytes(b"garbage")
    records, skipped = read_300w(tmp_path, on_error="skip")
    assert [r.source for r in records] == ["afw/a_good.jpg"]
    np.testing.assert_allclose(records[0].landmarks, good - 1)
    locations = [loc for loc, _ in skipped]
    assert len(skipped) == 3
    assert locations[0].endswith("b_short.pts:71") and locations[1].endswith("c_noimg.pts")
    assert locations[2] == str(corrupt)
    with pytest.raises(ValueError, match="on_error"):
        read_300w(tmp_path, on_error="ignore")


def test_data_error_format_and_pickle():
    err = DataError("a/b.pts", 4, "bad\nvalue")
    assert str(err) == "a/b.pts:4: bad value"
    assert str(DataError("a/b.pts", "missing")) == "a/b.pts: missing"
    assert str(DataError("a/b.pts", None, "missing")) == "a/b.pts: missing"
    assert str(DataError("a/b.pts", reason="gone", line=7)) == "a/b.pts:7: gone"
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, DataError) and (back.path, back.line, back.reason) == ("a/b.pts", 4, "bad value")


def test_read_dataset_dispatch(tmp_path):
    with pytest.raises(ValueError, match="300w.*adnet|adnet.*300w"):
        read_dataset("ibug", tmp_path)
    _face_folder(tmp_path, "x", np.full((68, 2), 20.0))
    assert len(read_dataset("300W", tmp_path).records) == 1
    assert read_dataset("300w", tmp_path, split="test").records == []
    with pytest.raises(DataError, match="no 300W folders"):
        read_300w(tmp_path / "afw")


# ------------------------------------------------------------------------------------------------
# Crop rule (method.md 8.1)
# ------------------------------------------------------------------------------------------------


def _record(points, box=(0, 0, 1, 1), center=None, scale=None) -> FaceRecord:
    return FaceRecord("t:x#0", "300w", "test", (), "x", "x", np.asarray(points, float), np.asarray(box, float),
                      center=center, scale=scale)


def test_crop_center_scale():
    rec = _record([[10, 20], [110, 50], [60, 80]], box=(0, 0, 40, 100))
    c, s = crop_center_scale(rec)
    np.testing.assert_allclose(c, [60.0, 50.0])
    assert s == pytest.approx(1.05 * 60 / 200)
    assert crop_center_scale(rec, side_rule="max")[1] == pytest.approx(1.05 * 100 / 200)
    c, s = crop_center_scale(rec, box_source="box", enlarge=1.0)
    np.testing.assert_allclose(c, [20.0, 50.0])
    assert s == pytest.approx(40 / 200)
    meta = _record([[0, 0], [1, 1]], center=np.array([5.0, 6.0]), scale=1.5)
    c, s = crop_center_scale(meta)
    np.testing.assert_array_equal(c, [5.0, 6.0])
    assert s == 1.5
    assert crop_center_scale(meta, use_metadata=False)[1] == pytest.approx(1.05 / 200)
