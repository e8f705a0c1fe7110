"""Kill a calibration with SIGKILL in the middle of a block, run the same command again, get the same result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

ARGS = ["method=omniquant", "quant=w4a4", "calib.nsamples=8", "method.epochs=8", "eval.max_windows=5",
        "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]


def command(out_dir):
    return [sys.executable, "train.py", *ARGS, f"output_dir={out_dir}"]


def run_to_end(out_dir):
    done = subprocess.run(command(out_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "results.json").read_text())


def test_sigkill_mid_block_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = run_to_end(tmp_path / "reference")

    out = tmp_path / "killed"
    in_progress = out / "checkpoints" / "block_001" / "last.ckpt"
    proc = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not in_progress.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed mid-block"
    assert (out / "blocks" / "block_000.safetensors").exists()
    assert not (out / "blocks" / "block_001.safetensors").exists(), "block 1 was not in progress"
    assert not (out / "results.json").exists()

    # the same folder started over under other settings (its run state deleted, say): block 1's checkpoint from
    # 8 epochs is not resumed by a 2-epoch run (Lightning refused it: "restored current_epoch ... max_epochs=2")
    other = tmp_path / "other-settings"
    shutil.copytree(out, other)
    for name in ("state.json", "config.yaml"):
        (other / name).unlink()
    done = subprocess.run([*command(other), "method.epochs=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written under other settings" in done.stdout + done.stderr

    first_seconds = json.loads((out / "state.json").read_text())["finished"]["0"]["seconds"]
    resumed = run_to_end(out)
    assert resumed["blocks"][0].get("resumed") == 1.0
    # the resumed block reports the time it took when it was calibrated, and the total counts it
    assert resumed["blocks"][0]["calibration_seconds"] == first_seconds > 0
    assert resumed["wall_seconds"]["calibration"] == pytest.approx(
        sum(b["calibration_seconds"] for b in resumed["blocks"]), abs=1e-2)
    assert resumed["perplexity"] == {k: {**v, "seconds": resumed["perplexity"][k]["seconds"],
                                         "source": resumed["perplexity"][k]["source"]}
                                     for k, v in reference["perplexity"].items()}
    for i in range(5):
        a = load_file(str(tmp_path / "reference" / "blocks" / f"block_{i:03d}.safetensors"))
        b = load_file(str(out / "blocks" / f"block_{i:03d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"block {i}: {k} differs after resume"


EVERY_METHOD = {
    "rtn": ["method=rtn", "quant=w3a16"],
    "gptq": ["method=gptq", "quant=w3a16"],
    "awq": ["method=awq", "quant=w4a16"],
    "smoothquant": ["method=smoothquant", "quant=w8a8"],
    "omniquant": ["method=omniquant", "quant=w4a16", "method.epochs=4"],
    "rptq": ["method=rptq", "quant=w4a4kv"],
    "vptq": ["method=vptq", "quant=vq2", "quant.w_vq.vector=2", "quant.w_vq.centroids=16", "quant.w_vq.normalize=false",
             "method.kmeans_iters=5"],
}
FAST = ["calib.nsamples=16", "eval.max_windows=5", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("method", sorted(EVERY_METHOD))
def test_every_method_resumes_after_sigkill_with_identical_results(tmp_path, method):
    """Killed as soon as its first block is finished (mid-block for the trained methods, between or inside blocks
    for the closed forms, always before the run ends), then the same command again: the same blocks, bit for bit,
    and the same perplexity as an uninterrupted run."""
    args = [sys.executable, "train.py", *EVERY_METHOD[method], *FAST]
    ref = subprocess.run([*args, f"output_dir={tmp_path / 'reference'}"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*args, f"output_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "blocks" / "block_000.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "results.json").exists(), "the run ended before the kill"
    again = subprocess.run([*args, f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "reference" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["perplexity"]["tinystories"]["perplexity"] == a["perplexity"]["tinystories"]["perplexity"]
    assert b["bits_per_weight"] == a["bits_per_weight"]
    for i in range(5):
        x = load_file(str(tmp_path / "reference" / "blocks" / f"block_{i:03d}.safetensors"))
        y = load_file(str(out / "blocks" / f"block_{i:03d}.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{method}: block {i} differs"


def test_an_in_progress_checkpoint_is_resumed_only_by_its_own_settings(tmp_path):
    from omniq_lightning.calib.state import RunState

    cfg = {"method": {"name": "omniquant", "epochs": 8}, "seed": 0}
    state = RunState.open(tmp_path, cfg)
    fp = {"formats": {"q": {"bits": 4}}, "method": {"settings": {"epochs": 8}}}
    assert state.begin_block(1, fp) is None
    ckpt = state.checkpoint_dir(1) / "last.ckpt"
    ckpt.write_bytes(b"an epoch's state")
    assert state.begin_block(1, json.loads(json.dumps(fp))) == ckpt  # the same settings resume
    assert RunState(tmp_path, {**cfg, "seed": 1}).begin_block(1, fp) is None  # another run's settings do not
    assert not ckpt.exists()
    ckpt.write_bytes(b"an epoch's state")
    assert state.begin_block(1, {**fp, "method": {"settings": {"epochs": 2}}}) is None and not ckpt.exists()
    ckpt.write_bytes(b"an epoch's state")
    state.forget_blocks(0)  # recalibrating from block 0 drops the later blocks' progress too
    assert not ckpt.exists()


def test_atomic_writes_leave_no_partial_file_and_the_usual_mode(tmp_path):
    from omniq_lightning.io import atomic_write, write_json

    target = tmp_path / "state.json"
    write_json(target, {"a": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # readable by others, like any file

    def crash(tmp: str) -> None:
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "a": 1\n}\n'  # the finished file is untouched
    assert sorted(os.listdir(tmp_path)) == ["plain", "state.json"]  # and no temporary file is left
