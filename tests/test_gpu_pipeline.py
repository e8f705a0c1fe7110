"""The GPU path end to end: the fused kernels inside real calibrations (skipped without a CUDA device).

Run on the GPU machine with cuda_ext/gpu_suite.sh (see cuda_ext/GPU.md). SmolLM2 cases run when its GGUF
file is under OMNIQ_MODELS_DIR.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from omniq_lightning.config import compose
from omniq_lightning.pipeline import run
from tests.conftest import MODELS_DIR, REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUICK = ["device=cuda", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]
SMOLLM2 = MODELS_DIR / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def quick(tmp_path, *overrides):
    """A quick CUDA run. A run that trains (OmniQuant) must have used the fused kernels; round-to-nearest
    weight-only needs no fake-quant at all (its folded weights are evaluated as they are)."""
    res = run(compose([*QUICK, *overrides, f"output_dir={tmp_path}"]))
    if "method=rtn" not in overrides:
        assert res["environment"]["fused_kernels"] in ("prebuilt", "JIT-compiled"), res["environment"]["fused_kernels"]
    return res


def test_the_fused_extension_builds_and_loads():
    from omniq_lightning.quant.cuda import load_extension

    assert load_extension() is not None, "the extension did not build: see the log line above"


@pytest.mark.parametrize("quant", ["w4a16", "w4a4"])
def test_stories260k_omniquant_with_fused_kernels_beats_rtn(tmp_path, quant):
    common = ["calib.nsamples=16", "eval.max_windows=20", f"quant={quant}"]
    rtn = quick(tmp_path / "rtn", "method=rtn", *common)["perplexity"]["tinystories"]["perplexity"]
    oq = quick(tmp_path / "oq", "method=omniquant", "method.epochs=5", *common)
    assert oq["perplexity"]["tinystories"]["perplexity"] < rtn
    assert oq["device"].startswith("cuda")


def test_gptq_rounding_after_training_runs_on_the_gpu(tmp_path):
    res = quick(tmp_path, "method=omniquant", "method.rounding=gptq", "method.epochs=2", "quant=w3a16",
                "calib.nsamples=8", "eval.max_windows=5")
    assert res["perplexity"]["tinystories"]["perplexity"] < 50


def test_resume_after_sigkill_on_the_gpu_matches(tmp_path):
    args = [sys.executable, "train.py", *QUICK, "quant=w4a4", "calib.nsamples=8", "method.epochs=6",
            "eval.max_windows=5"]
    ref = subprocess.run([*args, f"output_dir={tmp_path / 'ref'}"], cwd=REPO, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"output_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "block_001" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run([*args, f"output_dir={out}"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "ref" / "results.json").read_text())["perplexity"]["tinystories"]["perplexity"]
    b = json.loads((out / "results.json").read_text())["perplexity"]["tinystories"]["perplexity"]
    assert b == pytest.approx(a, rel=1e-6)


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="SmolLM2's GGUF file is not under OMNIQ_MODELS_DIR")
@pytest.mark.parametrize("quant", ["w4a16", "w4a4"])
def test_smollm2_on_the_gpu(tmp_path, quant):
    common = ["model=smollm2-135m", f"quant={quant}", "calib.nsamples=8", "calib.seqlen=512", "eval.max_windows=4",
              "eval.corpora=[wikitext2]"]
    rtn = quick(tmp_path / "rtn", "method=rtn", *common)["perplexity"]["wikitext2"]["perplexity"]
    oq = quick(tmp_path / "oq", "method=omniquant", "method.epochs=2", *common)["perplexity"]["wikitext2"]["perplexity"]
    assert oq < rtn
