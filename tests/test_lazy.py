"""Lazy loading (``model.lazy=true``): the model on the meta device, each block read from the checkpoint's shards
in its turn; calibration, resume, evaluation and export give what the model loaded whole gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniq_lightning.calib import RunState
from omniq_lightning.config import compose
from omniq_lightning.models import load_model
from omniq_lightning.pipeline import run

QUICK = ["calib.nsamples=8", "eval.max_windows=8", "trainer.enable_progress_bar=false"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_export(a: Path, b: Path) -> None:
    ta, tb = tensors(a / "model"), tensors(b / "model")
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def sharded(stories_dir, tmp_path_factory) -> Path:
    """stories260K saved in several safetensors shards (with an index), as large checkpoints come."""
    folder = tmp_path_factory.mktemp("stories-sharded")
    m = load_model(str(stories_dir))
    m.model.save_pretrained(folder, max_shard_size="200KB")
    m.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture(scope="module")
def untied(stories_dir, tmp_path_factory) -> Path:
    """stories260K with a head of its own (as most large models have), saved in shards."""
    folder = tmp_path_factory.mktemp("stories-untied")
    m = load_model(str(stories_dir))
    m.model.config.tie_word_embeddings = False
    head = m.model.model.embed_tokens.weight.detach().clone()
    m.model.lm_head.weight = torch.nn.Parameter(head + 0.01 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    m.model.save_pretrained(folder, max_shard_size="200KB")
    m.tokenizer.save_pretrained(folder)
    return folder


def test_an_untied_head_is_read_only_where_it_is_used(untied, tmp_path):
    lazy = load_model(str(untied), lazy=True)
    assert lazy.model.lm_head.weight.is_meta and not lazy.model.model.embed_tokens.weight.is_meta
    with lazy.head_loaded():
        assert not lazy.model.lm_head.weight.is_meta
    assert lazy.model.lm_head.weight.is_meta
    res = {flag: run(compose([f"model.path={untied}", "method=rtn", *QUICK, f"model.lazy={flag}",
                              f"output_dir={tmp_path / flag}"])) for flag in ("false", "true")}
    assert res["true"]["perplexity"]["tinystories"]["perplexity"] == res["false"]["perplexity"]["tinystories"]["perplexity"]
    assert "lm_head.weight" in tensors(tmp_path / "true" / "model")
    assert_same_export(tmp_path / "false", tmp_path / "true")


def test_a_lazy_model_holds_no_block_weights_and_reads_them_exactly(sharded):
    eager, lazy = load_model(str(sharded)), load_model(str(sharded), lazy=True)
    blocks = lazy.adapter.blocks(lazy.model)
    assert all(p.is_meta for b in blocks for p in b.parameters())
    assert not any(p.is_meta for n, p in lazy.model.named_parameters() if not n.startswith("model.layers."))
    assert lazy.model.lm_head.weight is lazy.model.model.embed_tokens.weight  # tied, as from_pretrained ties
    for i in range(len(blocks)):
        read = lazy.read_block(i)
        assert all(p.is_meta for p in blocks[i].parameters())  # the model's own block stays on the meta device
        for (n, p), (_, q) in zip(read.named_parameters(), eager.adapter.blocks(eager.model)[i].named_parameters(),
                                  strict=True):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("method,quant,extra", [
    ("rtn", "w4a16", []),
    ("gptq", "w3a16", []),
    ("omniquant", "w4a4", ["method.epochs=1"]),  # activation quantizers: the runtime state in the export too
])
def test_lazy_calibration_evaluation_and_export_equal_the_eager_run(sharded, tmp_path, method, quant, extra):
    results = {}
    for lazy in (False, True):
        out = tmp_path / f"lazy-{lazy}"
        results[lazy] = run(compose([f"model.path={sharded}", f"method={method}", f"quant={quant}", *extra, *QUICK,
                                     f"model.lazy={str(lazy).lower()}", f"output_dir={out}"]))
    for key in ("perplexity", "perplexity_fp"):
        assert results[True][key]["tinystories"]["perplexity"] == results[False][key]["tinystories"]["perplexity"]
    assert results[True]["perplexity"]["tinystories"]["placement"][0] == "blockwise"
    assert_same_export(tmp_path / "lazy-False", tmp_path / "lazy-True")
    # the sharded export of a lazy run loads as an ordinary transformers checkpoint
    again = load_model(str(tmp_path / "lazy-True" / "model"))
    ref = load_model(str(tmp_path / "lazy-False" / "model"))
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.model(ids).logits, ref.model(ids).logits)


def test_a_lazy_run_resumes_the_blocks_an_eager_run_finished(sharded, tmp_path):
    base = ["method=rtn", "quant=w4a16", f"model.path={sharded}", *QUICK, "eval.fp_baseline=false"]
    whole = run(compose([*base, f"output_dir={tmp_path / 'whole'}"]))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part)
    state = RunState.open(part, json.loads(json.dumps(whole["config"])))
    state.forget_blocks(3)
    resumed = run(compose([*base, "model.lazy=true", f"output_dir={part}"]))
    assert [bool(b.get("resumed")) for b in resumed["blocks"]] == [True, True, True, False, False]
    assert resumed["perplexity"] == {k: {**v, "placement": resumed["perplexity"][k]["placement"],
                                         "seconds": resumed["perplexity"][k]["seconds"]}
                                     for k, v in whole["perplexity"].items()}
    assert_same_export(tmp_path / "whole", part)


def test_lazy_full_precision_evaluation_equals_the_eager_one(sharded, tmp_path):
    res = {lazy: run(compose([f"model.path={sharded}", "method=fp", "eval.max_windows=8", f"model.lazy={lazy}",
                              f"output_dir={tmp_path / lazy}"]))
           for lazy in ("false", "true")}
    assert res["true"]["perplexity"]["tinystories"]["perplexity"] == pytest.approx(
        res["false"]["perplexity"]["tinystories"]["perplexity"], rel=1e-6)


def test_a_missing_shard_is_named_before_anything_is_read(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(str(broken), lazy=True)


def test_a_checkpoint_without_safetensors_is_refused_with_the_fix(sharded, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(sharded / "config.json", folder)
    with pytest.raises(FileNotFoundError, match="safetensors.*model.lazy=false"):
        load_model(str(folder), lazy=True)


def test_a_tensor_missing_from_the_checkpoint_is_named(sharded, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("model.norm.weight", "model.final_norm.weight"): v
                           for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match="model.norm.weight.*model.lazy=false"):
        load_model(str(folder), lazy=True)


@pytest.mark.parametrize("overrides,match", [
    (["rotation=quarot", "quant=w4a4"], "whole-model passes"),
    (["eval.tasks=[arc_easy]"], "eval.tasks"),
])
def test_what_needs_the_whole_model_is_refused_under_lazy_loading(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run(compose(["model.lazy=true", *overrides, f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())
