"""``flare models``: list, pull and promote registered models (MLflow model registry)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from flare.platform.checkpoints import atomic_write_bytes


def _client(tracking_uri: str | None):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flare.platform.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def list_models(tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One entry per registered model: name, versions, aliases and the val NME of each version."""
    client = _client(tracking_uri)
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{rm.name}'")
        out.append({"name": rm.name, "aliases": dict(rm.aliases or {}),
                    "versions": [{"version": v.version, "run_id": v.run_id, "val_nme": v.tags.get("val_nme")}
                                 for v in sorted(versions, key=lambda v: int(v.version))]})
    return out


def parse_model_ref(ref: str) -> str:
    """``NAME``, ``NAME@alias`` or ``NAME/version`` (or a full ``models:/`` URI) -> a models:/ URI."""
    if ref.startswith("models:/"):
        return ref
    if "@" not in ref and "/" not in ref:
        return f"models:/{ref}@champion"
    return f"models:/{ref}"


def pull(ref: str, out: Path, tracking_uri: str | None = None, overwrite: bool = False) -> Path:
    """Download weights, config, layout and a model card into ``out`` (atomically, temp then rename)."""
    import mlflow

    from flare.platform.predictor import ModelLoadError, Predictor

    _client(tracking_uri)
    uri = parse_model_ref(ref)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "mlflow")))
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for a bad reference
            raise ModelLoadError(f"{uri}: cannot pull ({str(err).splitlines()[0]})") from None
        state = next(local.rglob("state.pt"), None)
        if state is None:
            raise ModelLoadError(f"{uri}: not a flare model (no state.pt)")
        shutil.copy2(state, tmp / "state.pt")
        shutil.copy2(state.parent / "job.json", tmp / "job.json")
        shutil.rmtree(tmp / "mlflow")
        predictor = Predictor.from_dir(tmp, device="cpu")
        atomic_write_bytes(tmp / "MODEL_CARD.md", model_card(uri, predictor).encode())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(uri: str, predictor: Any) -> str:
    """A short human-readable card: what the model is, how it was selected, how to use it."""
    job, info = predictor.job, predictor.info
    n_params = sum(p.numel() for p in predictor.model.parameters())
    return "\n".join([
        f"# {uri}", "",
        f"- layout: {predictor.layout.name} ({predictor.layout.num_points} points)",
        f"- model: stacked hourglass, {job.model.stacks} stacks x {job.model.channels} ch, "
        f"{job.data.input_size} px input, AAM {'on' if job.model.aam else 'off'}, {n_params:,} parameters",
        f"- objective: {job.objective.name}",
        f"- selected on validation: epoch {info.get('epoch')}, val NME {info.get('val_nme')}, "
        f"{info.get('weights')} weights, decoder {predictor.decoder}",
        f"- training data: {job.data.manifest}",
        "", "```python", "import flare, cv2",
        f"p = flare.Predictor.load('{uri}')",
        "landmarks = p.predict(cv2.imread('face.jpg'))  # list of (N, 2) arrays, original pixels",
        "```", "",
    ])


def promote(name: str, version: str, alias: str = "champion", tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` of ``name``."""
    client = _client(tracking_uri)
    client.get_model_version(name, str(version))  # raises for an unknown version
    client.set_registered_model_alias(name, alias, str(version))


def version_info(name: str, alias: str, tracking_uri: str | None = None) -> dict[str, Any] | None:
    """The version an alias points to, with its tags, or None if the alias is unset."""
    client = _client(tracking_uri)
    try:
        v = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MLflow raises when the alias or model does not exist
        return None
    return {"version": v.version, "run_id": v.run_id, "tags": dict(v.tags)}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
