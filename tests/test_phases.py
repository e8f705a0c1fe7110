"""Where calibration time goes: the phase recorder's accounting, and the breakdown a run writes."""

import json

import pytest

from omniq_lightning.calib import phases
from omniq_lightning.calib.phases import PhaseRecorder, phase, recording
from omniq_lightning.config import compose
from omniq_lightning.pipeline import run


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_nested_phases_are_charged_exclusively(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(phases.time, "perf_counter", clock)
    with recording() as rec:
        with phase("outer"):
            clock.t += 1.0
            with phase("inner"):
                clock.t += 2.0
            clock.t += 0.5
            with phase("inner"):
                clock.t += 0.25
        with phase("after"):
            clock.t += 4.0
    assert rec.seconds == pytest.approx({"outer": 1.5, "inner": 2.25, "after": 4.0})


def test_a_phase_outside_a_recording_only_labels_the_work():
    with phase("nothing records this"):
        x = 1 + 1
    assert x == 2
    rec = PhaseRecorder()
    assert rec.seconds == {}


def test_a_phase_that_raises_is_still_charged_and_closed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(phases.time, "perf_counter", clock)
    with recording() as rec:
        with phase("outer"):
            with pytest.raises(RuntimeError), phase("failing"):
                clock.t += 3.0
                raise RuntimeError("boom")
            clock.t += 1.0
    assert rec.seconds == pytest.approx({"failing": 3.0, "outer": 1.0})


def test_a_run_records_each_blocks_phases_and_their_totals(tmp_path, stories_dir, data_dir):
    cfg = compose(["method=awq", "quant=w4a16", "calib.nsamples=4", "eval.max_windows=2", f"output_dir={tmp_path}",
                   "trainer.enable_progress_bar=false"])
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["calibration_phases"] == results["calibration_phases"]
    totals = saved["calibration_phases"]
    assert totals["blocks_calibrated"] == len(saved["blocks"])
    expected = {"full-precision outputs", "setup", "awq scale search", "awq clipping search", "input sampling",
                "fold and save", "quantized outputs"}
    assert expected <= set(totals["seconds"])
    for record in saved["blocks"]:
        assert expected <= set(record["phases"])
        # exclusive times inside the block: together no more than the block's own time
        assert sum(record["phases"].values()) <= record["seconds"] + 1e-2
    for name, seconds in totals["seconds"].items():
        assert seconds == pytest.approx(sum(r["phases"].get(name, 0.0) for r in saved["blocks"]), abs=1e-2)
