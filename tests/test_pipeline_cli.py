"""The entry point: config composition, the fp baseline run, results.json and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from omniq_lightning.config import compose
from omniq_lightning.pipeline import run
from tests.conftest import REPO


def test_every_model_and_quant_config_composes():
    """Every yaml file in configs/model and configs/quant (a new one is covered without listing it here)."""
    from omniq_lightning.mixed import quant_settings

    models = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
    assert {"stories260k", "smollm2-135m", "llama3.2-1b", "qwen3-0.6b", "gemma3-1b", "phi3-mini", "mixtral-8x7b"} <= set(models)
    for model in models:
        cfg = compose([f"model={model}"])
        assert cfg.model.name == model and cfg.eval.seqlen == cfg.model.seqlen
        assert cfg.model.trust_remote_code is False
    for preset in sorted(p.stem for p in (REPO / "configs" / "quant").glob("*.yaml")):
        quant = compose([f"quant={preset}"]).quant
        spec, mixed = quant_settings(quant)
        if preset in ("mixed", "gguf_mixed"):
            assert mixed is not None and mixed.avg_bits > 2
            assert {c.kind for c in mixed.candidates if c.quantized} == {"scalar" if preset == "mixed" else "gguf"}
        else:  # the name a preset declares (gguf's names its type or mix) is the one its settings give
            assert mixed is None and spec.name == quant.name and (spec.name == preset or preset.startswith("gguf"))


def test_fp_run_writes_results(tmp_path):
    cfg = compose(["model=stories260k", "method=fp", f"output_dir={tmp_path}", "eval.max_windows=5"])
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["perplexity"] == results["perplexity"]
    ts = saved["perplexity"]["tinystories"]
    assert ts["windows"] == 5 and ts["seqlen"] == 256 and ts["windows_available"] >= 5
    assert 3.0 < ts["perplexity"] < 9.0
    assert saved["method"] == "fp" and saved["quant"] is None
    assert set(saved["wall_seconds"]) == {"load", "evaluate_fp", "quantize", "calibration", "evaluate", "total"}
    assert saved["memory"]["cpu_peak_rss_gib"] > 0
    assert saved["environment"]["versions"]["torch"]
    assert "git_commit" in saved["environment"]


def test_seqlen_longer_than_context_is_rejected(tmp_path):
    cfg = compose(["model=stories260k", f"output_dir={tmp_path}", "eval.seqlen=1024"])
    with pytest.raises(ValueError, match="eval.seqlen=1024 is longer than the model's context of 512"):
        run(cfg)


def test_bad_quant_settings_fail_before_loading(tmp_path):
    cfg = compose(["model=stories260k", f"output_dir={tmp_path}", "quant.w_bits=12"])
    with pytest.raises(ValueError, match="w_bits=12 is out of range"):
        run(cfg)


def test_cli_runs_fp_and_rejects_unknown_model(tmp_path):
    ok = subprocess.run(
        [sys.executable, "train.py", "model=stories260k", "method=fp", f"output_dir={tmp_path}", "eval.max_windows=3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tinystories" in ok.stdout and (tmp_path / "results.json").is_file()
    bad = subprocess.run([sys.executable, "train.py", "model=llama9-1t"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0
    assert "llama9-1t" in bad.stderr and "stories260k" in bad.stderr  # Hydra lists the available model configs


def test_wandb_without_an_api_key_goes_offline_and_says_so(tmp_path):
    pytest.importorskip("wandb")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc credentials either
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "train.py", "logger=wandb", "quant=w4a16", "calib.nsamples=2", "method.epochs=1",
         "eval.max_windows=2", "eval.fp_baseline=false", "trainer.enable_progress_bar=false", f"output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no API key found" in done.stdout
    assert list((out / "wandb").glob("offline-run-*"))


def test_bf16_mixed_calibrates_on_cpu_and_16_mixed_is_refused_there(tmp_path):
    """bf16 autocast on the CPU (oneDNN's bf16 matmuls): a run trains, records its precision and quantizes."""
    with pytest.raises(ValueError, match="16-mixed needs a CUDA device"):
        run(compose([f"output_dir={tmp_path / 'fp16'}", "device=cpu", "trainer.precision=16-mixed"]))
    res = run(compose([f"output_dir={tmp_path / 'bf16'}", "device=cpu", "trainer.precision=bf16-mixed",
                       "method.epochs=1", "calib.nsamples=4", "eval.max_windows=4", "trainer.enable_progress_bar=false"]))
    assert res["config"]["trainer"]["precision"] == "bf16-mixed"
    ppl = res["perplexity"]["tinystories"]["perplexity"]
    assert 1.0 < ppl < 2 * res["perplexity_fp"]["tinystories"]["perplexity"]
