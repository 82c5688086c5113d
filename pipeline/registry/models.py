"""Registered models: put an export folder into the MLflow model registry, and get it back by URI.

A model version's source is the ``export/`` artifact folder of the run that trained it: the safetensors
weights and ``metadata.json`` its objective wrote (``pipeline.exports``), never the training checkpoint, whose
optimizer state is of no use downstream. We store plain files rather than an MLflow "flavor": the
PyTorch flavor's default pt2 serialisation specialises on the example's batch size, and our loader needs
the position-embedding metadata anyway.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from ..exports.files import read_metadata
from ..exports.vit import load_encoder
from ..models import ViTEncoder
from ..models.config import grid_of
from ..models.pos_embed import GridChange, grid_change
from .lineage import RECIPE_HASH, RUN_ID, version_tags

EXPORT_ARTIFACT = "export"


class ModelError(ValueError):
    """A model URI that names nothing, or a registered model whose files are missing or inconsistent."""


@dataclass
class ModelRef:
    """A resolved model: where its files are locally, and (for registry URIs) which version it is."""

    uri: str
    folder: Path
    name: str | None = None
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str | None:
        return self.tags.get(RUN_ID)

    def metadata(self) -> dict[str, Any]:
        return read_metadata(self.folder)


def register_export(client: MlflowClient, export_dir: str | Path, run_id: str, name: str, alias: str,
                    tags: dict[str, str] | None = None) -> Any:
    """Log ``export_dir`` as the run's ``export/`` artifacts and register it as a new version of ``name``
    with ``alias`` pointing at it; ``tags`` are added to the lineage tags. Returns the MLflow ModelVersion."""
    meta = read_metadata(export_dir)
    client.log_artifacts(run_id, str(export_dir), EXPORT_ARTIFACT)
    run = client.get_run(run_id)
    try:
        client.create_registered_model(name, description="vitpipe export: safetensors weights + metadata.json")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{EXPORT_ARTIFACT}", run_id=run_id,
                                          tags={**version_tags(run, meta), **(tags or {})})
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, "vitpipe.registered_model", f"models:/{name}/{version.version}")
    return version


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None);
    ``models:/name/latest`` -> (name, "latest", None), the newest version."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and (version.isdigit() or version == "latest"):
            return name, version, None
    raise ModelError(f"{uri}: expected models:/<name>@<alias>, models:/<name>/<version> or models:/<name>/latest")


def _version(client: MlflowClient, uri: str, tracking_uri: str) -> Any:
    name, number, alias = parse_model_uri(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ModelError(f"{uri}: no registered model named {name!r} at {tracking_uri}") from None
    if alias is not None:
        if alias not in model.aliases:
            known = ", ".join(sorted(model.aliases)) or "none"
            raise ModelError(f"{uri}: model {name!r} has no alias {alias!r} (aliases: {known})")
        number = model.aliases[alias]
    elif number == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ModelError(f"{uri}: model {name!r} has no versions yet")
        number = max(int(v.version) for v in versions)
    try:
        return client.get_model_version(name, str(number))
    except MlflowException:
        raise ModelError(f"{uri}: model {name!r} has no version {number}") from None


def cache_root() -> Path:
    return Path(os.environ.get("VITPIPE_CACHE", Path.home() / ".cache" / "vitpipe")) / "models"


def resolve_model(uri: str, tracking_uri: str) -> ModelRef:
    """A registry URI (downloaded once into the cache) or a local export folder -> ModelRef, checked."""
    if not uri.startswith("models:/"):
        folder = Path(uri)
        if not folder.is_dir():
            raise ModelError(f"{uri}: neither a models:/ URI nor an export folder")
        return _checked(ModelRef(uri, folder))
    client = MlflowClient(tracking_uri)
    mv = _version(client, uri, tracking_uri)
    # Versions are immutable: the cache key is what identifies one (server, name, version, source).
    key = hashlib.sha256(f"{tracking_uri}|{mv.name}|{mv.version}|{mv.source}".encode()).hexdigest()[:16]
    root = cache_root()
    folder = root / f"{mv.name}-v{mv.version}-{key}"
    if not (folder / ".complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))  # moved into place only when whole
        try:
            # The version's source (the run's export/ artifacts), not models:/...: MLflow 3.17 resolves a
            # models:/ URI partly through the process-wide default registry, whatever registry_uri says.
            local = Path(download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=tracking_uri))
        except (MlflowException, OSError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(f"{uri}: cannot download version {mv.version} from {mv.source}: {err}") from None
        shutil.rmtree(folder, ignore_errors=True)
        (local / ".complete").touch()
        local.rename(folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return _checked(ModelRef(uri, folder, mv.name, str(mv.version), dict(mv.tags)))


def _checked(ref: ModelRef) -> ModelRef:
    """Refuse a model whose metadata is missing, of another format, or disagrees with its version tags."""
    if not (ref.folder / "metadata.json").is_file():
        raise ModelError(f"{ref.uri}: no metadata.json in the model's files ({ref.folder})")
    try:
        meta = ref.metadata()
    except (ValueError, OSError) as err:
        raise ModelError(f"{ref.uri}: unreadable metadata: {err}") from None
    if "normalisation" not in meta:
        raise ModelError(f"{ref.uri}: metadata.json has no 'normalisation' section")
    if not ({"objective", "encoder", "timm"} & set(meta)):  # (exports before objectives were recorded: by contents)
        raise ModelError(f"{ref.uri}: metadata.json names no objective and describes no model")
    tagged = ref.tags.get(RECIPE_HASH)
    if tagged and meta.get("recipe_hash") and tagged != meta["recipe_hash"]:
        raise ModelError(f"{ref.uri}: metadata recipe hash {meta['recipe_hash']} differs from the version's "
                         f"tag {tagged}: the files are not the ones that were registered")
    return ref


def resolution_change(ref: ModelRef, image_size: tuple[int, int] | None) -> GridChange | None:
    """How loading ``ref``'s encoder at ``image_size`` changes its position embedding; None when the patch grid
    stays the same (or no size is asked for)."""
    enc = ref.metadata().get("encoder")
    if enc is None or image_size is None:
        return None
    return grid_change(enc["pos_embed"], grid_of(tuple(image_size), enc["patch_size"]))


def load_model_encoder(ref: ModelRef, image_size: tuple[int, int] | None = None, fresh: bool = False) -> ViTEncoder:
    """The encoder of a resolved model, positions resampled to ``image_size`` when given; ``fresh``: its
    architecture with newly initialised weights."""
    if "encoder" not in ref.metadata():
        raise ModelError(f"{ref.uri}: a timm classifier ({ref.metadata()['timm']['arch']}), not a ViT encoder")
    try:
        return load_encoder(ref.folder, image_size, fresh)
    except (RuntimeError, KeyError, TypeError, ValueError, FileNotFoundError) as err:
        raise ModelError(f"{ref.uri}: weights do not match metadata.json: {err}") from None


def tag_version(client: MlflowClient, ref: ModelRef, tags: dict[str, str]) -> None:
    """Attach tags (e.g. evaluation metrics) to the model version ``ref`` names; no-op for a folder."""
    if ref.name is None:
        return
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, value)
