"""Corpora, calibration sampling and the perplexity protocol on the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from omniq_lightning.data import calibration_windows, eval_windows, load_corpus, tokenize
from omniq_lightning.eval import perplexity


def test_calibration_sampling_is_reproducible_and_seed_dependent():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 16, 128, seed=0)
    b = calibration_windows(ids, 16, 128, seed=0)
    c = calibration_windows(ids, 16, 128, seed=1)
    assert a.shape == (16, 128)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # windows are contiguous slices of the corpus
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 127, dtype=torch.long))


def test_real_corpus_sampling_is_reproducible(stories, data_dir):
    ids = tokenize(load_corpus("tinystories", "calib", data_dir), stories.tokenizer)
    assert torch.equal(calibration_windows(ids, 8, 256, 3), calibration_windows(ids, 8, 256, 3))
    assert not torch.equal(calibration_windows(ids, 8, 256, 3), calibration_windows(ids, 8, 256, 4))


def test_tinystories_halves_are_disjoint(data_dir):
    calib = load_corpus("tinystories", "calib", data_dir)
    ev = load_corpus("tinystories", "eval", data_dir)
    assert calib.documents and ev.documents
    assert not set(calib.documents) & set(ev.documents)
    assert "local file" in ev.origin


def test_local_corpora_follow_the_paper_texts(data_dir):
    wt = load_corpus("wikitext2", "eval", data_dir)
    assert wt.documents[0] == (data_dir / "wikitext2" / "test.raw.txt").read_text(encoding="utf-8")
    assert load_corpus("wikitext2", "calib", data_dir).origin.endswith("valid.tokens.txt")
    assert load_corpus("ptb", "eval", data_dir).origin.endswith("ptb.test.txt")


def test_stories260k_perplexity_matches_the_published_figure(stories, data_dir):
    """Whole local sample, windows of 256 tokens: about 5.57 according to ../shared/README.md (5.61 here)."""
    sample = [s for s in (data_dir / "tinystories" / "valid.sample.txt").read_text().splitlines() if s.strip()]
    from omniq_lightning.data import CorpusText

    ids = tokenize(CorpusText("tinystories", "eval", sample, None, "test"), stories.tokenizer)
    res = perplexity(stories.model, ids, 256, batch_size=8)
    assert res.windows == ids.numel() // 256 == 60
    assert abs(res.perplexity - 5.57) < 0.1


def test_perplexity_equals_mean_window_nll_and_reports_window_cap(stories):
    ids = torch.randint(3, 512, (1000,), generator=torch.Generator().manual_seed(0))
    res = perplexity(stories.model, ids, 100, max_windows=4, batch_size=3)
    assert (res.windows, res.windows_available, res.tokens) == (4, 10, 400)
    nll = []
    with torch.no_grad():
        for w in eval_windows(ids, 100, 4):
            nll.append(stories.model(input_ids=w[None], labels=w[None]).loss.item())
    assert math.isclose(res.perplexity, math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_missing_corpus_names_both_places(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_corpus("ptb", "eval", tmp_path, online=False)
    msg = str(err.value)
    assert str(tmp_path) in msg and "ptb_text_only" in msg and "OMNIQ_DATA_DIR" in msg
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_corpus("wiki", "eval", tmp_path)


def test_corpus_shorter_than_one_window_is_rejected():
    with pytest.raises(ValueError, match="shorter than one window of seqlen=2048"):
        eval_windows(torch.arange(100), 2048)
    with pytest.raises(ValueError, match="shorter than one window"):
        calibration_windows(torch.arange(100), 4, 100, seed=0)


def test_evaluation_through_a_device_map_that_splits_the_model_matches(stories_dir, data_dir, tmp_path):
    """Evaluation goes through accelerate's device map (what lets a 70B model run on GPUs + CPU). On the CPU a
    ``max_memory`` smaller than the model forces a split (the blocks go to disk offload): same perplexity,
    and leaving the context puts every weight back on the CPU for quantization and export."""
    from omniq_lightning.eval import placed_for_evaluation
    from omniq_lightning.models import load_model

    loaded = load_model(str(stories_dir), dtype="float32")  # not the shared fixture: this test dispatches it
    ids = tokenize(load_corpus("tinystories", "eval", data_dir), loaded.tokenizer)
    whole = perplexity(loaded.model, ids, 256, max_windows=3).perplexity
    with placed_for_evaluation(loaded.model, torch.device("cpu"), {"cpu": "400KB"}, tmp_path) as placement:
        split = perplexity(loaded.model, ids, 256, max_windows=3, device=placement.input_device).perplexity
    assert placement.devices == ("cpu", "disk")
    assert split == pytest.approx(whole, rel=1e-6)
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert perplexity(loaded.model, ids, 256, max_windows=3).perplexity == pytest.approx(whole, rel=1e-6)


def test_a_run_evaluates_through_the_device_map(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    base = ["method=fp", "eval.max_windows=2", "trainer.enable_progress_bar=false"]
    whole = run(compose([*base, f"output_dir={tmp_path / 'a'}"]))["perplexity"]["tinystories"]["perplexity"]
    split = run(compose([*base, f"output_dir={tmp_path / 'b'}", "eval.max_memory={cpu: 400KB}"]))["perplexity"]
    assert split["tinystories"]["placement"] == ["cpu", "disk"]
    assert split["tinystories"]["perplexity"] == pytest.approx(whole, rel=1e-6)
