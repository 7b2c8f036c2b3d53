"""Exported models: ``config.json`` + ``model.safetensors``, and the checkpoint shipped inside.

An exported model holds just what sampling needs: the :class:`~trajflow_t2i.presets.T2IConfig`
and the weights of the NTM stage (no optimizer, no FM teacher). Loading never runs pickle;
a missing, truncated or altered file gives an error that names it.

The default checkpoint in ``trajflow_t2i/weights/`` is trained by the project's own command
(see the text-to-image page of the docs for the exact invocation)::

    trajflow-t2i train --preset small --out runs/small && \\
        trajflow-t2i export runs/small/final trajflow_t2i/weights

Example:
    >>> import tempfile, torch
    >>> from trajflow_t2i.model import TextToImage
    >>> from trajflow_t2i.presets import preset
    >>> model = TextToImage(preset("tiny"), stage="ntm")
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = export_model(model, folder)
    ...     again = load_model(folder)
    >>> all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
    ...                                       again.state_dict().values()))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trajflow_t2i.presets import T2IConfig

__all__ = ["CONFIG_FILE", "DEFAULT_WEIGHTS", "WEIGHTS_FILE", "export_model", "load_model"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "trajflow_t2i.model"
#: Where the shipped default checkpoint lives (package data).
DEFAULT_WEIGHTS = Path(__file__).parent / "weights"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_model(model, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` (a :class:`~trajflow_t2i.model.TextToImage`) to ``folder`` atomically.

    The files are written into a temporary folder beside ``folder`` and renamed into place
    once complete, so an interrupted export never leaves a half-written model.

    Args:
        model: The model to export.
        folder: Destination; replaced if it exists.
        extra: JSON-serialisable notes stored in ``config.json`` (e.g. how it was trained).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {
            key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()
        }
        save_file(tensors, staging / WEIGHTS_FILE)
        meta = {
            "format": FORMAT,
            "stage": model.stage,
            "config": _config_with_encoder(model).model_dump(mode="json"),
            "parameters": model.parameter_count(),
            "sha256": _sha256(staging / WEIGHTS_FILE),
            "extra": extra or {},
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # mkdtemp makes a private folder: give the export the usual permissions.
        os.chmod(staging, 0o755)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            os.chmod(staging / name, 0o644)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an exported model, validated.

    Raises:
        FileNotFoundError: If the folder or its config is missing.
        ValueError: If the config is not valid JSON or not an exported text-to-image model.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: expected an exported model folder with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a trajflow_t2i model config (format {FORMAT!r})")
    try:
        meta["config"] = T2IConfig.model_validate(meta.get("config"))
    except ValidationError as error:
        raise ValueError(f"{path} holds an invalid T2IConfig: {error}") from None
    if meta.get("stage") not in ("fm", "ntm"):
        raise ValueError(f"{path}: stage must be 'fm' or 'ntm', got {meta.get('stage')!r}")
    return meta


def _config_with_encoder(model) -> T2IConfig:
    """The model's config with the text encoder's full spec (the builtin one's vocabulary
    included), so a later change of the caption templates cannot re-map a shipped model."""
    config = model.config.model_copy(deep=True)
    config.model.text_encoder = model.text_encoder.spec()
    return T2IConfig.model_validate(config.model_dump())


def load_model(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Loads an exported model; ``None`` loads the default checkpoint shipped in the package.

    Raises:
        FileNotFoundError: If a file is missing (for the default: if none was shipped).
        ValueError: If a file is corrupt: unreadable JSON, a weights file that does not parse,
            whose checksum differs from the recorded one, or whose tensors do not fit the model.
    """
    from trajflow_t2i.model import TextToImage

    folder = DEFAULT_WEIGHTS if folder is None else Path(folder)
    meta = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    if meta.get("sha256") and _sha256(weights) != meta["sha256"]:
        raise ValueError(f"{weights} is corrupt: its sha256 differs from the one in {CONFIG_FILE}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    model = TextToImage(meta["config"], stage=meta["stage"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not fit the model of {folder / CONFIG_FILE}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()
