"""Run integrity: a result never describes weights it does not hold, every setting is checked before any work
(a refused run writes nothing), one run per output folder, and messages that say what is wrong and how to fix
it (issue 28: each case failed before the fix)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from omniq_lightning.config import compose
from omniq_lightning.pipeline import run
from tests.conftest import QUICK, REPO

MIXED = ["method=rtn", "quant=mixed", "quant.mixed.avg_bits=3", "quant.mixed.candidates=[w2,w3,w4,w8]"]


def quick(out, *overrides):
    return run(compose([*overrides, *QUICK, f"output_dir={out}"]))


def nothing_written(folder) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ---- 1. an edited bit plan and a rerun -------------------------------------------------------------------------------


def test_an_edited_plan_is_never_run_on_the_old_blocks(tmp_path):
    out = tmp_path / "run"
    first = quick(out, *MIXED)
    plan = json.loads((out / "bit_plan.json").read_text())
    name = next(n for n, f in sorted(plan["linears"].items()) if f["bits"] >= 3 and ".3." in n)
    plan["linears"][name] = {**plan["linears"][name], "bits": 2}  # in place: fewer bits, within the budget
    (out / "bit_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=f"block 3: {name}: w[34].* -> w2.*recalibrate_changed=true"):
        quick(out, *MIXED)
    redone = quick(out, *MIXED, "calib.recalibrate_changed=true")
    assert [b.get("resumed") for b in redone["blocks"]] == [1.0, 1.0, 1.0, None, None]  # from block 3 on
    assert redone["bits_per_weight"] < first["bits_per_weight"]
    fresh = quick(tmp_path / "fresh", *MIXED[:-1], f"quant.mixed.plan={out / 'bit_plan.json'}",
                  "quant.mixed.candidates=[w2,w3,w4,w8]")
    assert redone["bits_per_weight"] == fresh["bits_per_weight"]
    assert redone["perplexity"]["tinystories"]["perplexity"] == fresh["perplexity"]["tinystories"]["perplexity"]
    manifest = json.loads((out / "model" / "omniq_quant.json").read_text())
    assert manifest["formats"][name]["bits"] == 2 and manifest["name"] == "mixed3"
    # the same folder with another plan file: refused for the blocks it changes, not as "another configuration"
    other = json.loads((out / "bit_plan.json").read_text())
    last = next(n for n, f in sorted(other["linears"].items()) if ".4." in n and f["bits"] >= 3)
    other["linears"][last] = {**other["linears"][last], "bits": 2}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=f"cannot be reused \\(block 4: {last}"):
        quick(out, *MIXED, f"quant.mixed.plan={tmp_path / 'other.json'}")
    # a plan over the budget is refused, not run
    plan["linears"] = {n: {**f, "bits": 8} for n, f in plan["linears"].items()}
    (out / "bit_plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="above the budget quant.mixed.avg_bits=3.0: raise the budget"):
        quick(out, *MIXED)


# ---- 2. a plan path that is not a file -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_a_plan_path_that_is_not_a_file_is_refused(tmp_path, kind):
    path = tmp_path / "plans"
    if kind == "folder":
        path.mkdir()
    with pytest.raises(FileNotFoundError, match=f"quant.mixed.plan={path} (is a folder|does not exist)"):
        quick(tmp_path / "run", *MIXED, f"quant.mixed.plan={path}")
    assert nothing_written(tmp_path / "run")


# ---- 3. VQ resumes and re-exports ------------------------------------------------------------------------------------

VQ = ["method=vptq", "quant=vq2", "quant.w_vq.vector=2", "quant.w_vq.centroids=16", "quant.w_vq.normalize=false",
      "method.kmeans_iters=5", "export.dtype=float32"]


def test_a_finished_vq_run_reruns_and_exports_again(tmp_path):
    from transformers import AutoModelForCausalLM

    from omniq_lightning.export import load_vq_checkpoint

    first = quick(tmp_path, *VQ)
    again = quick(tmp_path, *VQ, "export.format=vq")
    assert all(b["resumed"] == 1.0 for b in again["blocks"])
    assert again["perplexity"] == {k: {**v, "seconds": again["perplexity"][k]["seconds"]}
                                   for k, v in first["perplexity"].items()}
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).state_dict()
    rebuilt = load_vq_checkpoint(tmp_path / "model-vq", dtype=torch.float32).state_dict()
    assert fake.keys() == rebuilt.keys() and all(torch.equal(fake[k], rebuilt[k]) for k in fake)


# ---- 4. one run per output folder ------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    args = [sys.executable, "train.py", "quant=w4a4", "method.epochs=200", "calib.nsamples=8", "eval.max_windows=2",
            "eval.fp_baseline=false", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before the second could start"
        with pytest.raises(RuntimeError, match=f"in use by another run \\(process {proc.pid} holds"):
            quick(tmp_path, "method=rtn", "quant=w3a16")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    from omniq_lightning.io import OutputLock

    with OutputLock(tmp_path):  # the kernel released the lock with the killed process
        pass


# ---- 5. the export is checked against the plan that runs -------------------------------------------------------------


def test_the_export_is_checked_against_the_plan_that_runs(tmp_path, stories):
    from omniq_lightning.mixed import BitPlan, linear_shapes
    from omniq_lightning.quant import WeightFormat

    shapes = linear_shapes(stories.model, stories.adapter)
    w8 = tmp_path / "w8.json"
    BitPlan({n: WeightFormat(8) for n in shapes}).save(w8, shapes)
    res = quick(tmp_path / "w8", "method=rtn", "quant=mixed", "quant.mixed.avg_bits=8.5", f"quant.mixed.plan={w8}",
                "export.format=gptq")
    assert res["export_packed"]["format"] == "gptq" and json.loads(
        (tmp_path / "w8" / "model-gptq" / "config.json").read_text())["quantization_config"]["bits"] == 8
    low = tmp_path / "low.json"
    BitPlan({n: WeightFormat(2 if i % 2 else 3) for i, n in enumerate(shapes)}).save(low, shapes)
    with pytest.raises(ValueError, match="export.format=compressed-tensors cannot hold.*packs \\(4, 8\\) bits"):
        quick(tmp_path / "low", "method=rtn", "quant=mixed", "quant.mixed.candidates=[w4,w8]", "quant.mixed.avg_bits=4",
              f"quant.mixed.plan={low}", "export.format=compressed-tensors")
    assert not (tmp_path / "low" / "blocks").exists()  # refused before any block was calibrated


# ---- 6. every setting checked before work; a refused run writes nothing ----------------------------------------------


@pytest.mark.parametrize("bad,message", [
    ("eval.tasks=[arc_easy,mmlu]", "eval.tasks: unknown zero-shot task\\(s\\) \\['mmlu'\\]"),
    ("eval.limit=0", "eval.limit must be a positive number"),
    ("eval.limit=abc", "eval.limit must be a positive number.*'abc'"),
    ("calib.seed=abc", "calib.seed must be an integer, got 'abc'"),
    ("calib.nsamples=ten", "calib.nsamples must be an integer"),
    ("export.format=bogus", "export.format must be one of"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        run(compose(["method=rtn", *QUICK, bad, f"output_dir={tmp_path / 'run'}"]))
    assert nothing_written(tmp_path / "run")


def test_a_refused_run_leaves_the_folder_free_for_the_corrected_command(tmp_path):
    with pytest.raises(ValueError, match="export.format"):
        quick(tmp_path, "method=rtn", "quant=w4a16", "export.format=bogus")
    res = quick(tmp_path, "method=gptq", "quant=w3a16")  # other quant settings: not "a different configuration"
    assert res["method"] == "gptq"
    done = subprocess.run([sys.executable, "train.py", "method=rtn", "export.format=bogus", f"output_dir={tmp_path / 'cli'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and nothing_written(tmp_path / "cli")  # Hydra writes nothing of its own either


# ---- 7. a mixed run is labelled as one -------------------------------------------------------------------------------


def test_a_mixed_run_is_labelled_mixed(tmp_path, capsys):
    res = quick(tmp_path, *MIXED)
    assert res["quant"]["name"] == "mixed3"
    assert json.loads((tmp_path / "model" / "omniq_quant.json").read_text())["name"] == "mixed3"
    assert f"rtn mixed3 ({res['bits_per_weight']:.2f} bits per weight)" in capsys.readouterr().out


# ---- 8. messages that say what is wrong and how to fix it ------------------------------------------------------------


def test_a_missing_task_file_is_named_with_the_fix(tmp_path, data_dir):
    local = tmp_path / "data"
    local.mkdir()
    for d in data_dir.iterdir():
        if d.name != "arc":
            (local / d.name).symlink_to(d)
    with pytest.raises(FileNotFoundError, match="arc_easy needs .*ARC-Easy-Test.jsonl.*paths.data_dir=null"):
        quick(tmp_path / "run", "method=fp", "eval.tasks=[arc_easy]", f"paths.data_dir={local}")


def test_one_task_name_is_a_task_not_letters():
    from omniq_lightning.eval.tasks import task_list

    assert task_list("arc_easy") == ["arc_easy"] and task_list("arc_easy, piqa") == ["arc_easy", "piqa"]
    assert task_list(["piqa"]) == ["piqa"] and task_list(None) == []


def test_damaged_run_state_files_are_named(tmp_path):
    from omniq_lightning.calib import CorruptCheckpointError, RunState

    RunState.open(tmp_path, {"seed": 0})
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=f"{tmp_path / 'state.json'} cannot be read.*another output_dir"):
        RunState.open(tmp_path, {"seed": 0})
    (tmp_path / "config.yaml").write_text("a: [unclosed")
    with pytest.raises(CorruptCheckpointError, match="config.yaml cannot be read"):
        RunState.open(tmp_path, {"seed": 0})


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_an_untrusted_checkpoint_is_refused_without_advice_to_load_it_unsafely(tmp_path, capsys):
    from omniq_lightning.calib import AtomicCheckpointIO, CorruptCheckpointError

    path = tmp_path / "last.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload()}, f)
    with pytest.raises(CorruptCheckpointError) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "weights_only=False" not in str(info.value) and "Delete it" in str(info.value)
    assert "never run" not in capsys.readouterr().out


def test_a_calibration_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    with pytest.raises(MemoryError, match="calib.nsamples=100000000 x calib.seqlen=256 needs 3 activation caches.*"
                                          "use fewer calib.nsamples"):
        run(compose(["method=rtn", "calib.nsamples=100000000", f"output_dir={tmp_path / 'run'}"]))
    assert nothing_written(tmp_path / "run")


def test_a_codebook_larger_than_its_linear_is_refused(tmp_path):
    with pytest.raises(ValueError, match="w_vq.centroids=65536 is more than the 1024 vectors of a 64x64 linear"):
        quick(tmp_path, "method=vptq", "quant=vq2", "quant.w_vq.centroids=65536")


def test_exported_files_get_the_mode_of_a_plain_open(tmp_path):
    quick(tmp_path, "method=rtn", "export.format=gptq")
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for folder in ("model", "model-gptq"):
        for f in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == expected, f
