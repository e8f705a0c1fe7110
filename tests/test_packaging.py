"""The declared dependency floors cover what the code uses (a floor below a used feature installs, then crashes)."""

from __future__ import annotations

import inspect
import re
import tomllib

from packaging.version import Version

from tests.conftest import REPO

# package -> (the oldest version the code runs on, why)
NEEDED = {
    "lightning": ("2.6", "Trainer.fit(weights_only=...) loads calibration checkpoints safely (added in 2.6.0)"),
    "transformers": ("5.17", "per-layer-type masks and rotary embeddings, fused MoE experts, from_pretrained(dtype=), "
                             "AttentionInterface; 5.17 is the oldest version tested (the GPU image's)"),
    "torch": ("2.6", "transformers 5 needs torch >= 2.6"),
    "accelerate": ("1.0", "dispatch_model / infer_auto_device_map for evaluation placement"),
    "lm-eval": ("0.4.13", "task configs as dicts with custom_dataset (local task files); 0.4.13 tested"),
}


def floors() -> dict[str, Version]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", dep)
        if m:
            out[m.group(1).lower()] = Version(m.group(2))
    return out


def test_dependency_floors_cover_what_the_code_uses():
    declared = floors()
    for package, (minimum, why) in NEEDED.items():
        assert package in declared, f"{package} must be declared: {why}"
        assert declared[package] >= Version(minimum), f"{package}>={declared[package]} is too low: {why}"


def test_the_features_behind_the_floors_are_there():
    import lightning as L
    import transformers

    assert "weights_only" in inspect.signature(L.Trainer.fit).parameters
    assert hasattr(transformers, "AttentionInterface")
