"""Checkpoints: a folder with ``config.json`` and ``weights.safetensors``; loading never unpickles.

``config.json`` holds everything that is JSON: the :class:`~trajflow.config.ModelConfig` the
model is rebuilt from, the training config, the step, optimizer hyper-parameters
(``param_groups``), the scheduler state, RNG states (as lists of integers) and any ``extra``
state. ``weights.safetensors`` holds every tensor under a string key: ``model/<name>``,
``ema/<name>`` (the averaged copy, if any) and ``optimizer/<param index>/<state name>``.

A checkpoint is written into a temporary folder next to its destination, synced to disk,
then renamed into place, so a crash never leaves a half-written checkpoint at ``path``.
``config.json`` also records the SHA-256 of both files (``checksums``), so a file that was cut
short or had bytes flipped after the save fails to load with a :class:`CheckpointError`
naming it, instead of silently giving wrong weights.

Example:
    >>> import tempfile
    >>> from trajflow.config import ModelConfig
    >>> config = ModelConfig(
    ...     predictor={"name": "mlp", "kwargs": {"features": 2, "hidden_features": [16]}}
    ... )
    >>> model = config.build()
    >>> folder = Path(tempfile.mkdtemp()) / "checkpoint"
    >>> _ = save_checkpoint(folder, model, config, step=7)
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'weights.safetensors']
    >>> loaded, state = load_checkpoint(folder)
    >>> state.step, state.model_config == config
    (7, True)
    >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from trajflow.config import ModelConfig

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "CheckpointState",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_checkpoint_config",
    "restore_rng_state",
    "restore_training_state",
    "save_checkpoint",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "trajflow-checkpoint"
VERSION = 2  # 2: config.json records checksums; 1 (no checksums) still loads, unverified
_VERSIONS = (1, 2)
_TENSOR = "__tensor__"  # marks a JSON value whose tensor lives in weights.safetensors
_PREFIX = "step_"
_CHECKSUMS = "checksums"
# Temporary folders of save_checkpoint: ".step_00000100.tmp-abc123", ".step_00000100.old-…".
_TEMPORARY = re.compile(rf"^\.({_PREFIX}\d+)\.(tmp|old)-")


class CheckpointError(ValueError):
    """A checkpoint folder is damaged: bad JSON, a wrong checksum, a cut weights file…

    The message names the file at fault.
    """


@dataclasses.dataclass
class CheckpointState:
    """Everything :func:`load_checkpoint` read besides the model.

    Attributes:
        model_config: The config the model was rebuilt from (``None`` if none was saved): a
            :class:`~trajflow.config.ModelConfig`, or the plain dict of another package's
            config (e.g. ``trajflow_t2i``'s), which that package validates itself.
        train_config: The training config as a plain dict (``None`` if none was saved).
        step: Number of training steps taken when the checkpoint was written.
        optimizer: An ``optimizer.state_dict()`` ready for ``load_state_dict`` (or ``None``).
        scheduler: A ``scheduler.state_dict()`` (or ``None``).
        ema: The EMA model's ``state_dict`` (or ``None``).
        rng: Global RNG states, see :func:`capture_rng_state` (or ``None``).
        extra: Free-form JSON state saved by the caller.
    """

    model_config: ModelConfig | dict[str, Any] | None
    train_config: dict[str, Any] | None
    step: int
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    ema: dict[str, Tensor] | None = None
    rng: dict[str, Any] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, Python, NumPy) as JSON-able lists."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "python": _jsonable(random.getstate()),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured (CUDA only if the device count matches)."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


# --------------------------------------------------------------------------- saving
def _jsonable(value: Any, where: str = "state") -> Any:
    """Tuples become lists; anything that JSON cannot hold raises a TypeError naming it."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(
        f"cannot save {where} in a checkpoint: expected JSON data (numbers, strings, lists, "
        f"dicts), got {type(value).__name__}"
    )


def _cpu_copy(tensor: Tensor) -> Tensor:
    # A copy, so that tensors sharing storage (tied weights) save independently.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _split_optimizer(state_dict: Mapping[str, Any], tensors: dict[str, Tensor]) -> dict:
    """JSON part of an optimizer state; its tensors go to ``tensors`` under string keys."""
    state = {}
    for index, values in state_dict["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, Tensor):
                key = f"optimizer/{index}/{name}"
                tensors[key] = _cpu_copy(value)
                entry[name] = {_TENSOR: key}
            else:
                entry[name] = _jsonable(value, f"optimizer.state[{index}].{name}")
        state[str(index)] = entry
    groups = _jsonable(state_dict["param_groups"], "optimizer.param_groups")
    return {"state": state, "param_groups": groups}


def _fsync(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk (folders cannot be synced everywhere)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(descriptor)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_TRAJFLOW_CONFIG = "trajflow.config.ModelConfig"


def _config_class(model_config: BaseModel | None) -> str | None:
    """The dotted class name saved beside a model config (informative; never imported)."""
    if model_config is None:
        return None
    if isinstance(model_config, ModelConfig):
        return _TRAJFLOW_CONFIG
    return f"{type(model_config).__module__}.{type(model_config).__qualname__}"


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    model_config: BaseModel | None,
    train_config: BaseModel | Mapping[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: nn.Module | None = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> Path:
    """Writes a checkpoint folder atomically.

    The folder is assembled under a temporary name in ``path``'s parent (hidden: it starts
    with a dot), its files and the folder are fsynced, and it is renamed to ``path``.
    ``config.json`` is written last and holds the SHA-256 of itself (without that entry) and
    of ``weights.safetensors``, which :func:`load_checkpoint` verifies. An existing checkpoint
    at ``path`` is replaced only once the new one is complete (it is moved aside, the new
    folder renamed in, then the old one deleted). On any error the temporary folder is
    removed and ``path`` is left as it was.

    Args:
        path: Destination folder.
        model: The model; its ``state_dict`` is saved under ``model/``.
        model_config: Config to rebuild the model with (``None``: load it into a model you
            build yourself, see :func:`load_checkpoint`).
        train_config: Training config (a pydantic model or a JSON-able mapping).
        optimizer: Optimizer whose state to save (hyper-parameters in JSON, moments as tensors).
        scheduler: LR scheduler whose (JSON-able) ``state_dict`` to save.
        ema: The exponential-moving-average copy of the model, saved under ``ema/``.
        step: Training steps taken so far.
        extra: More JSON-able state of the caller.
        rng: Also save the global RNG states.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: If some state is not JSON-able (the message names it) or ``model_config``
            is not a pydantic model. A :class:`~trajflow.config.ModelConfig` lets
            :func:`load_checkpoint` rebuild the model; another package's config is stored
            with its class name and handed back as a dict.
    """
    path = Path(path)
    if model_config is not None and not isinstance(model_config, BaseModel):
        raise TypeError(f"expected model_config to be a pydantic model, got {type(model_config)}")
    tensors = {f"model/{k}": _cpu_copy(v) for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema/{k}": _cpu_copy(v) for k, v in ema.state_dict().items()})
    if isinstance(train_config, BaseModel):
        train_config = train_config.model_dump(mode="json")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "model_config": None if model_config is None else model_config.model_dump(mode="json"),
        "model_config_class": _config_class(model_config),
        "train_config": _jsonable(train_config, "train_config"),
        "optimizer": None
        if optimizer is None
        else _split_optimizer(optimizer.state_dict(), tensors),
        "scheduler": None if scheduler is None else _jsonable(scheduler.state_dict(), "scheduler"),
        "ema": ema is not None,
        "rng": _jsonable(capture_rng_state(), "rng") if rng else None,
        "extra": _jsonable(dict(extra or {}), "extra"),
    }
    json.dumps(config)  # fail on unserialisable state before touching the disk

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        safetensors.torch.save_file(
            tensors, temporary / WEIGHTS_FILE, metadata={"format": "pt", "step": str(step)}
        )
        _fsync(temporary / WEIGHTS_FILE)
        # The config's own checksum covers everything but itself, the weights' one included.
        config[_CHECKSUMS] = {WEIGHTS_FILE: _sha256_file(temporary / WEIGHTS_FILE)}
        config[_CHECKSUMS][CONFIG_FILE] = _sha256(json.dumps(config, indent=2).encode())
        with open(temporary / CONFIG_FILE, "w") as file:
            file.write(json.dumps(config, indent=2))
            file.flush()
            os.fsync(file.fileno())
        _fsync(temporary)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temporary, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------- loading
def _damaged(file: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint file {file} {problem}; the checkpoint is damaged (resume from an older "
        "step_* folder by naming it, or delete this one)"
    )


def _required(path: Path, name: str) -> Path:
    file = path / name
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: {path} is not a complete trajflow checkpoint (expected "
            f"{CONFIG_FILE} and {WEIGHTS_FILE} in it)"
        )
    return file


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The verified contents of a checkpoint's ``config.json``, without loading the weights.

    Raises:
        FileNotFoundError: If ``path`` has no ``config.json`` or no ``weights.safetensors``.
        CheckpointError: If ``config.json`` is not valid JSON, not a trajflow checkpoint of a
            known version, or does not match its recorded checksum.
    """
    return _read_config(Path(path))[0]


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.json`` verified, and the checksums it records (empty for old checkpoints)."""
    config_file = _required(path, CONFIG_FILE)
    _required(path, WEIGHTS_FILE)
    try:
        config = json.loads(config_file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(config_file, f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _damaged(config_file, f"holds a {type(config).__name__}, expected a JSON object")
    if config.get("format") != FORMAT or config.get("version") not in _VERSIONS:
        raise CheckpointError(
            f"{config_file}: expected format {FORMAT!r} version {' or '.join(map(str, _VERSIONS))}"
            f", got {config.get('format')!r} version {config.get('version')!r}"
        )
    # Version 1 checkpoints were written before checksums existed: they load unverified.
    checksums = config.get(_CHECKSUMS)
    if checksums is None and config["version"] >= 2:
        raise _damaged(config_file, f"has no {_CHECKSUMS!r} entry")
    if checksums is not None:
        if not isinstance(checksums, dict):
            raise _damaged(config_file, f"has an invalid {_CHECKSUMS!r} entry")
        recorded = checksums.pop(CONFIG_FILE, None)
        if recorded != _sha256(json.dumps(config, indent=2).encode()):
            raise _damaged(config_file, "does not match the SHA-256 recorded in it")
    checksums = config.pop(_CHECKSUMS, None) or {}
    if not isinstance(config.get("step"), int) or config["step"] < 0:
        raise _damaged(config_file, f"has no valid step (got {config.get('step')!r})")
    return config, checksums


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config, checksums = _read_config(path)
    weights_file = path / WEIGHTS_FILE
    expected = checksums.get(WEIGHTS_FILE)
    if expected is not None and _sha256_file(weights_file) != expected:
        raise _damaged(
            weights_file,
            f"does not match the SHA-256 recorded in {CONFIG_FILE} (cut short or overwritten?)",
        )
    try:
        tensors = safetensors.torch.load_file(weights_file)
    except Exception as error:  # SafetensorError and friends: a cut or garbled file
        raise _damaged(weights_file, f"cannot be read as safetensors ({error})") from None
    return config, tensors


def _prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _join_optimizer(saved: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict:
    state = {}
    for index, values in saved["state"].items():
        state[int(index)] = {
            name: tensors[value[_TENSOR]] if isinstance(value, dict) and _TENSOR in value else value
            for name, value in values.items()
        }
    groups = []
    for group in saved["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):  # JSON turned the tuple into a list
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, CheckpointState]:
    """Loads a checkpoint written by :func:`save_checkpoint` (no pickle is ever run).

    Args:
        path: The checkpoint folder.
        model: Load the weights into this model instead of rebuilding one from the saved
            :class:`~trajflow.config.ModelConfig` (needed if none was saved).
        device: Where to put the model (default: where it is, i.e. CPU for a rebuilt model).

    Returns:
        The model (weights loaded strictly) and a :class:`CheckpointState` with the rest.

    Raises:
        FileNotFoundError: If ``path`` lacks ``config.json`` or ``weights.safetensors``.
        CheckpointError: If a file is damaged: ``config.json`` is not valid JSON or its
            content is invalid, or a file does not match the SHA-256 recorded at saving (a
            truncated or overwritten file). The message names the file.
        ValueError: If no model is given and no model config was saved.
        RuntimeError: If the weights do not match the model (missing or unexpected keys).

    Example:
        >>> load_checkpoint(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: .../config.json is missing: ...
    """
    path = Path(path)
    config, tensors = _read(path)
    model_config = config.get("model_config")
    foreign = config.get("model_config_class", _TRAJFLOW_CONFIG) != _TRAJFLOW_CONFIG
    if model_config is not None and not foreign:
        try:
            model_config = ModelConfig.model_validate(model_config)
        except ValueError as error:  # pydantic's ValidationError, unknown registry names
            raise CheckpointError(f"{path / CONFIG_FILE}: invalid model_config: {error}") from None
    if model is None:
        if model_config is None or foreign:
            raise ValueError(
                f"{path} has no trajflow model config: pass the model to load the weights into"
            )
        model = model_config.build()
    model.load_state_dict(_prefixed(tensors, "model/"), strict=True)
    if device is not None:
        model = model.to(device)
    saved_optimizer = config.get("optimizer")
    try:
        optimizer = None if saved_optimizer is None else _join_optimizer(saved_optimizer, tensors)
    except (KeyError, TypeError, AttributeError) as error:
        raise _damaged(path / CONFIG_FILE, f"has an invalid optimizer state ({error!r})") from None
    state = CheckpointState(
        model_config=model_config,
        train_config=config.get("train_config"),
        step=int(config["step"]),
        optimizer=optimizer,
        scheduler=config.get("scheduler"),
        ema=_prefixed(tensors, "ema/") if config.get("ema") else None,
        rng=config.get("rng"),
        extra=config.get("extra") or {},
    )
    return model, state


def restore_training_state(
    state: CheckpointState,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: nn.Module | None = None,
    rng: bool = True,
) -> None:
    """Puts the optimizer, scheduler, EMA model and global RNGs back as they were saved.

    Build the optimizer (and the scheduler on it) over the loaded model's parameters in the
    same order as when saving, then call this. Moment tensors move to their parameters'
    devices.

    Raises:
        ValueError: If something to restore was not saved in the checkpoint.
    """
    for name, target, saved in (
        ("optimizer", optimizer, state.optimizer),
        ("scheduler", scheduler, state.scheduler),
        ("ema", ema, state.ema),
    ):
        if target is not None and saved is None:
            raise ValueError(f"the checkpoint holds no {name} state to restore")
    if optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if ema is not None:
        ema.load_state_dict(state.ema, strict=True)
    if rng and state.rng is not None:
        restore_rng_state(state.rng)


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` steps in a run directory: ``step_00000100``."""
    return f"{_PREFIX}{step:08d}"


def _step_of(name: str) -> int | None:
    """``100`` for ``step_00000100``; ``None`` for any other name."""
    digits = name[len(_PREFIX) :]
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else None


def _run_checkpoints(path: Path) -> list[tuple[int, Path]]:
    children = path.iterdir() if path.is_dir() else ()
    found = [(_step_of(child.name), child) for child in children if child.is_dir()]
    return sorted((step, child) for step, child in found if step is not None)


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``path`` itself if it is one, else its newest ``step_*``.

    ``path`` is taken as a checkpoint if it holds ``config.json`` or ``weights.safetensors``.
    Otherwise the ``step_*`` folder with the highest step is returned *even if it is damaged
    or incomplete*: loading it then fails with an error naming the file, rather than
    resuming silently from an older checkpoint. (:func:`save_checkpoint` never leaves an
    incomplete ``step_*`` folder: its temporary folders are hidden and never match; one that
    is damaged was changed afterwards.) To go back to an older checkpoint, name it.

    Returns:
        The folder, or ``None`` if ``path`` holds no checkpoint.

    Example:
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    path = Path(path)
    if (path / CONFIG_FILE).exists() or (path / WEIGHTS_FILE).exists():
        return path
    found = _run_checkpoints(path)
    return found[-1][1] if found else None


def prune_checkpoints(path: str | os.PathLike, keep_last: int | None, step: int) -> list[Path]:
    """Deletes older ``step_*`` checkpoints of a run folder, keeping the newest ``keep_last``.

    Only checkpoints up to ``step`` (the one just written) are considered: the newest
    ``keep_last`` of them stay, older ones go. Checkpoints of later steps, left by an earlier
    run that went further than a resumed one, are not touched. Hidden temporary folders that an
    interrupted :func:`save_checkpoint` left behind for those steps are removed too.

    Args:
        path: The run folder.
        keep_last: How many checkpoints to keep (``None``: keep all; only clean up).
        step: The step of the checkpoint just written.

    Returns:
        The checkpoint folders deleted.

    Raises:
        ValueError: If ``keep_last`` is smaller than 1.

    Example:
        >>> run = Path(tempfile.mkdtemp())
        >>> for step in (10, 20, 30):
        ...     (run / checkpoint_name(step)).mkdir()
        >>> [p.name for p in prune_checkpoints(run, keep_last=2, step=30)]
        ['step_00000010']
        >>> sorted(p.name for p in run.iterdir())
        ['step_00000020', 'step_00000030']
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"expected keep_last >= 1 or None, got {keep_last}")
    path = Path(path)
    for child in path.iterdir() if path.is_dir() else ():
        match = _TEMPORARY.match(child.name)
        if match is None or _step_of(match[1]) > step:
            continue
        # An ".old-" folder holds a replaced checkpoint; it is garbage once its replacement
        # is in place (otherwise it is the only copy, so it stays).
        if match[2] == "tmp" or (path / match[1] / CONFIG_FILE).is_file():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last is None:
        return []
    candidates = [folder for found, folder in _run_checkpoints(path) if found <= step]
    doomed = candidates[:-keep_last]
    for folder in doomed:
        shutil.rmtree(folder)
    if doomed:
        _fsync(path)
    return doomed
