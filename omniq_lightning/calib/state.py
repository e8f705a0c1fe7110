"""Run state on disk: what a run is, which blocks are finished, and where the block in progress stands.

``output_dir/`` holds ``config.yaml`` (the settings that decide the result), ``state.json`` (finished
blocks with the SHA-256 of their files and the fingerprint of what decided them; the model-level stage's
decisions), ``blocks/block_NNN.safetensors`` per finished block, ``passes/<name>.safetensors`` for a pass that
saved tensors, and ``checkpoints/block_NNN/last.ckpt`` for the block in progress (with ``owner.json``: the settings
and block fingerprint it was written under; a checkpoint of other settings is never resumed). Every write is atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from omniq_lightning.calib.checkpoint import CorruptCheckpointError
from omniq_lightning.io import atomic_write, write_json
from omniq_lightning.passes import PassResult, SavedPass

log = logging.getLogger(__name__)

# The settings that decide a run's result; anything else (evaluation, logging, paths) may change on resume.
RESULT_KEYS = ("model", "quant", "method", "rotation", "calib", "seed", "trainer.precision", "resolved")
# (a bit plan file: what decides the blocks is its contents, which their fingerprints hold)
IGNORED_KEYS = ("calib.cache", "calib.cache_dir", "calib.recalibrate_changed", "quant.mixed.plan", "model.lazy",
                "calib.dist_timeout_minutes")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def result_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The flattened subset of a resolved config that decides the result."""
    flat = flatten(cfg)
    return {
        k: v for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in RESULT_KEYS) and k not in IGNORED_KEYS
    }


def read_record(path: Path, parse) -> dict[str, Any]:
    """A run-state file (config.yaml, state.json) as a mapping; a damaged one is reported with its path and the fix."""
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): the run "
            f"state in {path.parent} is damaged. Use another output_dir, or delete {path.parent} to start this run "
            "again") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} does not hold a mapping: the run state in {path.parent} is damaged. Use "
                                     f"another output_dir, or delete {path.parent} to start this run again")
    return data


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunState:
    def __init__(self, out_dir: str | Path, settings: dict[str, Any], finished: dict[str, dict] | None = None,
                 passes: dict[str, dict] | None = None, write: bool = True):
        self.dir = Path(out_dir)
        self.settings = settings
        self.finished: dict[str, dict] = finished or {}
        self.passes: dict[str, dict] = passes or {}
        self.write = write  # False: a follower's in-memory copy (a data-parallel rank other than 0)

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @classmethod
    def open(cls, out_dir: str | Path, cfg: dict[str, Any]) -> RunState:
        """Start a run in ``out_dir`` or continue the one there; a different configuration is refused."""
        out_dir = Path(out_dir)
        settings = result_settings(cfg)
        state_path, config_path = out_dir / "state.json", out_dir / "config.yaml"
        if state_path.is_file() and config_path.is_file():
            old = read_record(config_path, yaml.safe_load)
            diff = differing_keys(old, settings)
            if diff:
                details = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {settings.get(k, '<unset>')!r}" for k in diff)
                raise ValueError(
                    f"{out_dir} holds a run with a different configuration, so it cannot be resumed. Differing "
                    f"keys: {details}. Use the original settings to resume, or another output_dir for a new run"
                )
            data = read_record(state_path, json.loads)
            return cls(out_dir, settings, data.get("finished", {}), data.get("passes", {}))
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(config_path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(settings, sort_keys=True)))
        state = cls(out_dir, settings)
        state._write()
        return state

    @classmethod
    def follow(cls, out_dir: str | Path, cfg: dict[str, Any], record: tuple[dict, dict]) -> RunState:
        """A data-parallel rank's copy of the state rank 0 opened (``record``: its finished blocks and passes): it
        reads finished blocks from the folder and never writes."""
        return cls(out_dir, result_settings(cfg), *record, write=False)

    def check_writer(self) -> None:
        if not self.write:
            raise RuntimeError("only rank 0 writes the run state (this is a follower's copy)")

    def _write(self) -> None:
        if not self.write:
            return
        write_json(self.state_path, {"finished": self.finished, "passes": self.passes})

    def block_path(self, i: int) -> Path:
        return self.dir / "blocks" / f"block_{i:03d}.safetensors"

    def checkpoint_dir(self, i: int) -> Path:
        return self.dir / "checkpoints" / f"block_{i:03d}"

    def begin_block(self, i: int, fingerprint: dict[str, Any]) -> Path | None:
        """The checkpoint block ``i`` resumes from: its in-progress checkpoint when that was written under this run's
        settings and this block fingerprint, else none (a checkpoint another run left here, say with other epochs,
        is removed). Records whom the block's new checkpoints belong to."""
        self.check_writer()
        folder = self.checkpoint_dir(i)
        ckpt, owner_path = folder / "last.ckpt", folder / "owner.json"
        owner = json.loads(json.dumps({"settings": self.settings, "fingerprint": fingerprint}, sort_keys=True,
                                      default=str))
        if ckpt.is_file():
            try:
                if json.loads(owner_path.read_text(encoding="utf-8")) == owner:
                    return ckpt
            except (OSError, ValueError):
                pass
            log.warning("block %d: %s was written under other settings (or by an older version) than this run's: "
                        "calibrating the block from its start", i, ckpt)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(owner_path, owner)
        return None

    def is_finished(self, i: int) -> bool:
        return str(i) in self.finished

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                   seconds: float | None = None, fingerprint: dict[str, Any] | None = None) -> Path:
        """Store a finished block (tensors, and string metadata), record it with the seconds its calibration took
        and the fingerprint of what decided it, and drop its in-progress checkpoints."""
        self.check_writer()
        path = self.block_path(i)
        data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # one module may sit in several
        # places (an affine transform shared by q, k and v): each key gets its own copy
        atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))
        self.finished[str(i)] = {"file": str(path.relative_to(self.dir)), "sha256": sha256(path)}
        if seconds is not None:
            self.finished[str(i)]["seconds"] = round(float(seconds), 3)
        if fingerprint is not None:
            self.finished[str(i)]["fingerprint"] = fingerprint
        self._write()
        shutil.rmtree(self.checkpoint_dir(i), ignore_errors=True)
        return path

    def load_block(self, i: int) -> dict[str, torch.Tensor]:
        path = self.block_path(i)
        entry = self.finished[str(i)]
        if not path.is_file() or sha256(path) != entry["sha256"]:
            raise CorruptCheckpointError(
                f"finished block file {path} is missing or does not match its recorded hash: delete it and its "
                f"entry in {self.state_path} (or the whole output_dir) to recalibrate that block"
            )
        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CorruptCheckpointError(f"block file {path} cannot be read ({exc}); delete it to recalibrate") from exc

    def block_fingerprint(self, i: int) -> dict[str, Any] | None:
        """What decided finished block ``i`` (None for a block recorded before fingerprints existed)."""
        return self.finished.get(str(i), {}).get("fingerprint")

    def forget_blocks(self, first: int) -> None:
        """Forget finished blocks ``first`` and later (they will be calibrated again)."""
        for key in [k for k in self.finished if int(k) >= first]:
            del self.finished[key]
            if self.write:
                self.block_path(int(key)).unlink(missing_ok=True)
        self._write()
        if not self.write:
            return
        for folder in (self.dir / "checkpoints").glob("block_*"):  # in progress under the settings they replace
            if int(folder.name.split("_")[1]) >= first:
                shutil.rmtree(folder, ignore_errors=True)

    # --- the model-level stage -----------------------------------------------------------------------------------
    def pass_path(self, name: str) -> Path:
        return self.dir / "passes" / f"{name}.safetensors"

    def saved_pass(self, name: str) -> SavedPass | None:
        """What pass ``name`` saved in this folder (None if it never ran here)."""
        entry = self.passes.get(name)
        if entry is None:
            return None
        tensors: dict[str, torch.Tensor] = {}
        if entry.get("sha256"):
            path = self.pass_path(name)
            if not path.is_file() or sha256(path) != entry["sha256"]:
                raise CorruptCheckpointError(f"{path} is missing or does not match its recorded hash: use a new "
                                             f"output_dir (the finished blocks depend on what the {name} pass decided)")
            tensors = load_file(str(path))
        return SavedPass(entry["record"], tensors, entry["digest"])

    def save_pass(self, name: str, result: PassResult) -> None:
        """Record a pass's decision (its record, tensors and digest)."""
        self.check_writer()
        entry: dict[str, Any] = {"record": result.record, "digest": result.digest()}
        if result.formats is not None:
            entry["formats"] = {n: {**f.to_dict(), "kind": f.kind} for n, f in sorted(result.formats.items())}
        if result.tensors:
            path = self.pass_path(name)
            data = {k: v.detach().cpu().contiguous() for k, v in result.tensors.items()}
            atomic_write(path, lambda tmp: save_file(data, tmp))
            entry["sha256"] = sha256(path)
        self.passes[name] = entry
        self._write()

    def block_seconds(self, i: int) -> float | None:
        """The seconds finished block ``i`` took to calibrate, in the run that did it (None if not recorded)."""
        seconds = self.finished.get(str(i), {}).get("seconds")
        return None if seconds is None else float(seconds)

    def block_metadata(self, i: int) -> dict[str, str]:
        """The string metadata stored with finished block ``i`` (e.g. the weight format of each linear)."""
        with safe_open(str(self.block_path(i)), framework="pt") as f:
            return dict(f.metadata() or {})
