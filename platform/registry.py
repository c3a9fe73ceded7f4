"""``flare models``: list, pull and promote registered models (MLflow model registry)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from flare.files import atomic_write_bytes, check_replaceable, new_temp_dir, replace_dir
from flare.platform.config import JobConfig


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
    """Download weights, config, layout and a model card into ``out`` (temp dir, then a swap). An existing
    ``out`` is replaced only with ``overwrite`` and only when flare wrote it or it is empty
    (:func:`flare.files.check_replaceable`)."""
    import mlflow

    from flare.platform.predictor import ModelLoadError, Predictor

    _client(tracking_uri)
    uri = parse_model_ref(ref)
    out = Path(out)
    check_replaceable(out, (), overwrite, _pulled_before)
    tmp = new_temp_dir(out)
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
        replace_dir(tmp, out, overwrite, (), "flare models pull", _pulled_before)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pulled_before(directory: Path) -> bool:
    """A model folder pulled before the ``.flare-output`` marker: exactly what ``pull`` writes."""
    return {p.name for p in Path(directory).iterdir()} == {"state.pt", "job.json", "MODEL_CARD.md"}


def model_card(uri: str, predictor: Any) -> str:
    """A short human-readable card: what the model is, how it was selected, how to use it."""
    job, info = predictor.job, predictor.info
    n_params = sum(p.numel() for p in predictor.model.parameters())
    return "\n".join([
        f"# {uri}", "",
        f"- layout: {predictor.layout.name} ({predictor.layout.num_points} points)",
        (f"- model: stacked hourglass, {job.model.stacks} stacks x {job.model.channels} ch, "
         f"{job.data.input_size} px input, AAM {'on' if job.model.aam else 'off'}, {n_params:,} parameters"),
        f"- objective: {job.objective.name}",
        (f"- selected on validation: epoch {info.get('epoch')}, val NME {info.get('val_nme')}, "
         f"{info.get('weights')} weights, decoder {predictor.decoder}"),
        f"- training data: {job.data.manifest}",
        "", "```python", "import flare, cv2",
        f"p = flare.Predictor.load('{uri}')",
        "faces = flare.predict_faces(p, cv2.imread('face.jpg'))  # list of (N, 2) arrays, original pixels",
        "# (what `flare predict` runs: detector, wide first look, re-crop; p.predict(image) is one pass)",
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


def champion_if_better(job: JobConfig, version: str, new_nme: float, tracking_uri: str) -> tuple[bool, str]:
    """Tag ``version`` of ``job.mlflow.registered_model`` with the identity of its validation split, then
    let :func:`decide_champion` move ``champion`` only if it is better on that same split."""
    name = job.mlflow.registered_model
    key = val_split_key(job.data.manifest, job.data.val_split, job.data.max_val_samples)
    _client(tracking_uri).set_model_version_tag(name, version, "flare.val_split", key or "unknown")
    return decide_champion(name, version, new_nme, key, tracking_uri)


def decide_champion(name: str, version: str, new_nme: float, split_key: str | None,
                    tracking_uri: str) -> tuple[bool, str]:
    """Point ``champion`` at ``version`` if there is none, or if ``new_nme`` is strictly lower than the
    champion's val NME measured on the same validation split. Returns (promoted, the printed line)."""
    champ = version_info(name, "champion", tracking_uri)
    head = f"{name} v{version}: val NME {100 * new_nme:.3f}%"
    if champ is None:
        promote(name, version, "champion", tracking_uri)
        return True, f"{head}; no champion yet -> champion = v{version}"
    old = champ["tags"].get("val_nme")
    old_key = champ["tags"].get("flare.val_split") or _run_split_key(champ["run_id"], tracking_uri)
    head += f"; champion v{champ['version']}: val NME {100 * float(old):.3f}%" if old is not None else \
        f"; champion v{champ['version']}: val NME unknown"
    if old is None or split_key is None or old_key != split_key:
        return False, f"{head} on a different validation split -> not comparable, champion stays v{champ['version']}"
    if new_nme < float(old):
        promote(name, version, "champion", tracking_uri)
        return True, f"{head} -> better, champion = v{version}"
    return False, f"{head} -> not better, champion stays v{champ['version']}"


def val_split_key(manifest_path: str, split: str, max_samples: int | None) -> str | None:
    """Identity of a validation set: the content hashes of its shards, the split and the sample cap."""
    import hashlib

    from flare.datasets.ingest import load_manifest

    try:
        shards = load_manifest(manifest_path).data["shards"]
    except (OSError, ValueError):
        return None
    shas = sorted(s.get("sha256", s["path"]) for s in shards if s.get("split") == split)
    if not shas:
        return None
    return hashlib.sha256(json.dumps([shas, max_samples]).encode()).hexdigest()[:16]


def _run_split_key(run_id: str, tracking_uri: str) -> str | None:
    from mlflow.tracking import MlflowClient

    try:
        p = MlflowClient(tracking_uri).get_run(run_id).data.params
    except Exception:  # noqa: BLE001 - a deleted run: nothing to compare against
        return None
    cap = p.get("data.max_val_samples")
    return val_split_key(p.get("data.manifest", ""), p.get("data.val_split", "val"),
                         None if cap in (None, "None") else int(cap))
