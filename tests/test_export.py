"""ONNX export: the exported graph (network + decoder) reproduces Predictor.predict_batch on onnxruntime,
with a dynamic batch, flare metadata, and the ``flare export onnx`` / ``flare predict --backend onnx`` CLI."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flare.datasets.augment import crop_matrix, to_tensor_image
from flare.datasets.crop_prior import fit_crop_prior
from flare.models.layouts import get_layout
from flare.platform.builders import build_model
from flare.platform.cli import app
from flare.platform.config import load_job
from flare.platform.export import LandmarkGraph, export_onnx
from flare.platform.onnx_backend import OnnxLandmarks
from flare.platform.predictor import ModelLoadError, Predictor

pytest.importorskip("onnxruntime", reason="install the onnx extra: pip install 'flare-landmarks[onnx]'")

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TOL_PX = 0.01


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine, OpenMP spinning makes tiny forwards 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _predictor(decoder: str) -> Predictor:
    """tiny.yaml with 2 stacks, seeded random weights; RwSA's signed maps for the argmax decoders."""
    objective = "star" if decoder == "softargmax" else "rwsa"
    job = load_job(REPO / "jobs" / "tiny.yaml", [f"objective.name={objective}", "model.stacks=2"])
    layout = get_layout(job.model.layout)
    torch.manual_seed(0)
    model = build_model(job, layout).eval()
    return Predictor.from_job(model, job, layout, decoder, info={"decoder": decoder})


def _real_images() -> list[np.ndarray]:
    root = os.environ.get("FLARE_TEST_DATA")
    images = sorted((Path(root) / "300W" / "afw").glob("*.jpg"))[:4] if root else []
    return [cv2.imread(str(p)) for p in images]


@pytest.fixture(scope="module")
def crops() -> tuple[torch.Tensor, np.ndarray]:
    """4 crops (4, 3, S, S) of real 300W faces (landmark-extent boxes) when FLARE_TEST_DATA is set, else
    seeded random crops; with their crop -> original matrices."""
    images = _real_images()
    if len(images) < 4:
        gen = torch.Generator().manual_seed(1)
        return torch.rand(4, 3, SIZE, SIZE, generator=gen) * 2 - 1, np.tile(np.eye(3), (4, 1, 1))
    root = Path(os.environ["FLARE_TEST_DATA"]) / "300W" / "afw"
    out, mats = [], []
    for path in sorted(root.glob("*.jpg"))[:4]:
        pts = np.loadtxt(path.with_suffix(".pts"), comments=("version", "n_points", "{", "}"))
        image = cv2.imread(str(path))
        side = float((pts.max(0) - pts.min(0)).max())
        m = crop_matrix((pts.max(0) + pts.min(0)) / 2, 1.05 * side / 200.0, SIZE)
        out.append(to_tensor_image(cv2.warpAffine(image, m[:2], (SIZE, SIZE), flags=cv2.INTER_LINEAR)))
        mats.append(np.linalg.inv(m))
    return torch.stack(out), np.stack(mats)


@pytest.fixture(scope="module", params=["softargmax", "argmax", "argmax_refine"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, Path]:
    predictor = _predictor(request.param)
    path = export_onnx(predictor, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return predictor, path


def test_graph_decoder_matches_predictor(exported: tuple[Predictor, Path], crops: tuple) -> None:
    predictor, _ = exported
    x, _ = crops
    with torch.no_grad():
        got = LandmarkGraph.from_predictor(predictor)(x).double().numpy()
    want = predictor.predict_batch(x)
    assert got.shape == want.shape == (4, 68, 2)
    assert np.abs(got - want).max() <= TOL_PX
    assert want.std() > 0.5  # not a degenerate all-equal prediction


def test_onnxruntime_matches_predictor_dynamic_batch(exported: tuple[Predictor, Path], crops: tuple) -> None:
    predictor, path = exported
    x, to_orig = crops
    onnx_model = OnnxLandmarks(path, threads=1)
    want = predictor.predict_batch(x)
    got4 = onnx_model.predict_batch(x)
    got1 = onnx_model.predict_batch(x[2:3])
    assert got4.shape == (4, 68, 2) and got1.shape == (1, 68, 2)
    assert np.abs(got4 - want).max() <= TOL_PX
    assert np.abs(got1[0] - want[2]).max() <= TOL_PX
    assert np.abs(onnx_model.predict_batch(x, to_orig) - predictor.predict_batch(x, to_orig)).max() <= TOL_PX
    if predictor.decoder == "argmax":  # integer heatmap px -> crop px on a fixed lattice
        assert np.allclose(got4, want, atol=1e-4)


def test_metadata_describes_the_graph(exported: tuple[Predictor, Path]) -> None:
    import onnx

    predictor, path = exported
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["flare.layout"] == "300w68" and meta["flare.num_landmarks"] == "68"
    assert meta["flare.input_size"] == str(SIZE) and meta["flare.decoder"] == predictor.decoder
    assert "BGR" in meta["flare.input"] and "127.5" in meta["flare.input"]
    assert "1.05" in meta["flare.crop_rule"] and "crop pixels" in meta["flare.output"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def _model_dir(tmp_path: Path, decoder: str) -> Path:
    predictor = _predictor(decoder)
    directory = tmp_path / "model"
    directory.mkdir()
    torch.save(predictor.model.state_dict(), directory / "state.pt")
    meta = {"job": predictor.job.model_dump(mode="json"), "layout": "300w68", "info": {"decoder": decoder}}
    (directory / "job.json").write_text(json.dumps(meta))
    return directory


def test_cli_export_writes_file_and_refuses_bad_model(tmp_path: Path) -> None:
    runner = CliRunner()
    model_dir = _model_dir(tmp_path, "argmax_refine")
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert OnnxLandmarks(out).decoder == "argmax_refine"
    (tmp_path / "empty").mkdir()
    bad = runner.invoke(app, ["export", "onnx", str(tmp_path / "empty"), "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no state.pt" in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_cli_predict_onnx_backend_matches_torch(tmp_path: Path) -> None:
    images = _real_images()[:1] or [np.random.default_rng(0).integers(0, 255, (120, 100, 3), np.uint8)]
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), images[0])
    model_dir = _model_dir(tmp_path, "softargmax")
    runner = CliRunner()
    results = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        r = runner.invoke(app, ["predict", str(image), "--model", str(model_dir), "--out", str(out),
                                "--no-detect", "--backend", backend])
        assert r.exit_code == 0, r.output
        results[backend] = json.loads(next(out.glob("*.json")).read_text())
    torch_pts, onnx_pts = (np.asarray(results[b]["faces"][0]) for b in ("torch", "onnx"))
    assert torch_pts.shape == (68, 2)
    px_per_crop_px = 1.05 * min(images[0].shape[:2]) / SIZE  # --no-detect: the whole image is the face box
    assert np.abs(torch_pts - onnx_pts).max() <= TOL_PX * px_per_crop_px + 1e-4  # JSON rounds to 1e-4


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared 40-face synthetic 300W-layout dataset (val carved from train; 8 test faces)."""
    from flare.datasets.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("synthetic") / "data"
    prepare("synthetic", Path("."), out, PrepareOptions(seed=0), engine="local", synthetic_count=40)
    return out


def test_int8_export_quantizes_the_convolutions_only(tmp_path: Path, synthetic_data: Path) -> None:
    """``flare export onnx --int8 --calibrate DATA``: every Conv reads int8 weights through DequantizeLinear,
    the decoder stays fp32, flare's metadata is kept and says how it was calibrated, the batch stays dynamic,
    the file shrinks, and the landmarks stay close to the fp32 graph's on the dataset's crops."""
    import onnx

    from flare.datasets.ingest import BatchBuilder, iter_local_rows, load_manifest

    model_dir = _model_dir(tmp_path, "softargmax")
    runner = CliRunner()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(fp32)]).exit_code == 0
    r = runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(int8), "--int8", "--calibrate",
                            str(synthetic_data), "--calibration-faces", "3"])
    assert r.exit_code == 0, r.output
    assert "int8 convolutions calibrated on 3 val faces" in r.output
    model = onnx.load(str(int8))
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(producer[c.input[1]].op_type == "DequantizeLinear" for c in convs)
    assert all(init[producer[c.input[1]].input[0]].data_type == onnx.TensorProto.INT8 for c in convs)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "ReduceSum"}  # the decoder is in there
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["flare.layout"] == "300w68" and meta["flare.decoder"] == "softargmax"
    assert meta["flare.quantization"].startswith("int8 Conv") and f"3 crops of {synthetic_data} (val)" in meta[
        "flare.quantization"]
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    manifest = load_manifest(synthetic_data)
    rows = next(iter_local_rows(manifest, "test", 8))
    x = BatchBuilder(manifest.layout, SIZE, augment=False)(rows)["image"]
    a, b = OnnxLandmarks(fp32, threads=1).predict_batch(x), OnnxLandmarks(int8, threads=1).predict_batch(x)
    assert a.shape == b.shape == (len(rows), 68, 2)
    spread = float(np.linalg.norm(a - a.mean(axis=(0, 1)), axis=-1).mean())  # how far landmarks lie apart
    err = float(np.linalg.norm(a - b, axis=-1).mean())
    print(f"\n[int8] mean landmark shift vs fp32 {err:.3f} crop px; landmark spread {spread:.2f} px")
    assert err < 0.1 * spread  # measured 4.5% with these random weights; a collapsed or broken graph: ~100%


def test_int8_export_refuses_missing_or_bad_calibration(tmp_path: Path, synthetic_data: Path) -> None:
    model_dir = _model_dir(tmp_path, "softargmax")
    runner = CliRunner()
    other = tmp_path / "wflw"  # the same shards, declared as another layout
    shutil.copytree(synthetic_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "layout": "wflw98"}))
    for extra, expected in ((["--int8"], "--int8 and --calibrate DATA go together"),
                            (["--calibrate", str(synthetic_data)], "--int8 and --calibrate DATA go together"),
                            (["--int8", "--calibrate", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
                            (["--int8", "--calibrate", str(other)], "layout wflw98 does not match the model's 300w68")):
        r = runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(tmp_path / "q.onnx"), *extra])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and expected in lines[0], r.output
        assert not (tmp_path / "q.onnx").exists()


def test_eval_on_onnxruntime_matches_torch(tmp_path: Path, synthetic_data: Path) -> None:
    """``flare eval --backend onnx`` on an exported graph gives torch's metrics; a decoder the graph does not
    hold is refused in one line."""
    model_dir = _model_dir(tmp_path, "softargmax")
    runner = CliRunner()
    assert runner.invoke(app, ["export", "onnx", str(model_dir), "--out", str(tmp_path / "m.onnx")]).exit_code == 0
    results = {}
    for backend, model in (("torch", model_dir), ("onnx", tmp_path / "m.onnx")):
        r = runner.invoke(app, ["eval", str(model), "--data", str(synthetic_data), "--backend", backend])
        assert r.exit_code == 0, r.output
        results[backend] = json.loads(r.output)
    assert results["torch"]["faces"] == results["onnx"]["faces"] == 8
    assert results["onnx"]["nme"] == pytest.approx(results["torch"]["nme"], rel=1e-4)
    bad = runner.invoke(app, ["eval", str(tmp_path / "m.onnx"), "--data", str(synthetic_data), "--backend", "onnx",
                              "--decoder", "argmax"])
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "decodes with softargmax" in lines[0], bad.output


def test_onnx_model_carries_the_crop_prior(tmp_path: Path) -> None:
    """The re-crop prior travels in the ONNX metadata (two-pass prediction on onnxruntime re-crops as torch
    does); a model exported without one has none; a malformed one is refused in one line naming file and key."""
    import onnx

    rng = np.random.default_rng(0)
    shapes = rng.normal(size=(1, 68, 2)) * 30 * rng.uniform(0.8, 1.2, (30, 1, 1)) + rng.normal(0, 2, (30, 68, 2))
    predictor = _predictor("argmax")
    predictor.crop_prior = fit_crop_prior(shapes, shapes.mean(axis=1), shapes.std(axis=(1, 2)) * 4)
    path = export_onnx(predictor, tmp_path / "prior.onnx")
    loaded = OnnxLandmarks(path, threads=1).crop_prior
    assert loaded is not None and loaded.faces == 30
    for got, want in zip(loaded.crops(shapes[:3] + 50), predictor.crop_prior.crops(shapes[:3] + 50), strict=True):
        assert np.array_equal(got, want)
    assert OnnxLandmarks(export_onnx(_predictor("argmax"), tmp_path / "plain.onnx")).crop_prior is None
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "flare.crop_prior":
            prop.value = prop.value[:-5]
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ModelLoadError, match=r"^\S+bad\.onnx: flare\.crop_prior is not JSON \("):
        OnnxLandmarks(tmp_path / "bad.onnx")
