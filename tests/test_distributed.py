"""Data-parallel calibration (torchrun, gloo on the CPU): two ranks give one process's result, across two "nodes" on
the loopback interface too; a world that cannot share the samples is refused before any work; a rank that dies
is named, and the run resumes under another world size."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniq_lightning import distributed
from omniq_lightning.config import compose
from omniq_lightning.distributed import World, check_batch, shard_ids
from omniq_lightning.memory import ModelSizes, PlanSettings, fixes_for, plan_memory
from omniq_lightning.models import meta_model
from omniq_lightning.pipeline import prepare, run

REPO = Path(__file__).resolve().parents[1]
QUICK = ["calib.nsamples=8", "eval.max_windows=4", "eval.fp_baseline=false", "trainer.enable_progress_bar=false",
         "logger=none"]


# --- sharing the samples -------------------------------------------------------------------------------------------


def test_the_world_comes_from_torchruns_environment():
    assert World.from_env({}) == World()
    w = World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.nodes, w.main) == (3, 4, 1, 2, 2, False)


def test_shares_cover_every_sample_once():
    for chunk in (1, 2, 4):
        shares = [shard_ids(16, World(rank=r, size=4), chunk) for r in range(4)]
        assert sorted(j for s in shares for j in s) == list(range(16))
        assert all(len(s) == 4 for s in shares)
    assert shard_ids(8, World(rank=1, size=2), 4) == [4, 5, 6, 7]  # contiguous shares (closed forms)
    # a global batch of 4 split over 2 ranks: each global batch's first half on rank 0, second half on rank 1
    assert shard_ids(8, World(rank=0, size=2), 2) == [0, 1, 4, 5]


def test_worlds_that_cannot_share_the_work_are_refused():
    with pytest.raises(ValueError, match=r"calib.nsamples=7 cannot be shared evenly by 2 ranks.*calib.nsamples=6"):
        shard_ids(7, World(rank=0, size=2), 1)
    with pytest.raises(ValueError, match=r"method.batch_size=1 .*multiple of 2"):
        check_batch(World(rank=0, size=2), 8, 1)
    with pytest.raises(ValueError, match=r"calib.nsamples=6 is not a whole number of global batches"):
        check_batch(World(rank=0, size=2), 6, 4)
    assert check_batch(World(rank=0, size=2), 8, 4) == 2


@pytest.mark.parametrize("overrides, message", [
    (["method=gptq", "calib.nsamples=7"], r"calib.nsamples=7 cannot be shared evenly by 2 ranks"),
    (["method=omniquant"], r"method.batch_size=1 is the global batch"),
    (["method=rptq", "quant=w4a8"], r"RPTQ trains its clipping"),
    (["method=rptq", "quant=w4a8", "method.epochs=0", "method.observer=ema_minmax"], r"ema_minmax"),
    (["method=gptq", "rotation=quarot"], r"whole-model passes .* run in one process"),
])
def test_a_data_parallel_run_is_refused_before_loading(overrides, message, monkeypatch, tmp_path):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        prepare(compose([*overrides, f"output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())


def test_the_memory_plan_shares_the_caches_and_counts_each_ranks_process(stories_dir):
    model, adapter = meta_model(str(stories_dir))
    sizes = ModelSizes.of(model, adapter)
    base = dict(nsamples=128, seqlen=2048, cache_bytes=2, caches=3, cache_where="device", device="cuda", lazy=False)
    one = plan_memory(sizes, PlanSettings(**base))
    four = plan_memory(sizes, PlanSettings(**base, ranks=4, ranks_per_node=2))
    assert four.device.terms["activation caches"] * 4 == one.device.terms["activation caches"]
    assert four.cpu.total == 2 * one.cpu.total  # two processes on each node
    # a device short of the caches' room is told how many ranks would fit
    free = one.device.total - one.device.terms["activation caches"] // 2
    fixes = list(fixes_for(one, "device", one.device, free))
    assert any(f.startswith("more ranks: torchrun with 2 ranks") for f in fixes), fixes


# --- two ranks against one process (stories260K) -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_ranks() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "train.py", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env_for_ranks(), capture_output=True, text=True, timeout=timeout)


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def perplexity(run_dir: Path) -> float:
    return json.loads((run_dir / "results.json").read_text())["perplexity"]["tinystories"]["perplexity"]


def assert_same_result(one: Path, two: Path, atol: float) -> None:
    """The same perplexity (to 1e-4 relative) and exported weights within ``atol`` (measured: RTN, GPTQ, AWQ,
    SmoothQuant bit-identical; OmniQuant's DDP training 9e-6, its gradients summed in another order)."""
    assert perplexity(two) == pytest.approx(perplexity(one), rel=1e-4)
    ta, tb = tensors(one), tensors(two)
    assert set(ta) == set(tb)
    for k in ta:
        torch.testing.assert_close(tb[k].float(), ta[k].float(), atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("method, extra, atol", [
    ("rtn", ["quant=w4a16"], 0.0),
    ("gptq", ["quant=w4a16"], 1e-3),
    ("awq", ["quant=w4a16"], 1e-3),
    ("smoothquant", ["quant=w8a8"], 1e-3),
    ("omniquant", ["quant=w4a16", "method.batch_size=2", "method.epochs=2"], 1e-3),
])
def test_two_ranks_give_one_process_result(method, extra, atol, tmp_path):
    overrides = [f"method={method}", *extra, *QUICK]
    run(compose([*overrides, f"output_dir={tmp_path / 'one'}"]))
    done = torchrun(["--standalone", "--nproc_per_node=2"], [*overrides, f"output_dir={tmp_path / 'two'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(tmp_path / "one", tmp_path / "two", atol)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["memory_plan"]["cpu"]["total_gib"] > 0
    assert not (tmp_path / "two" / "cache").exists() or not any((tmp_path / "two" / "cache").iterdir())


def test_two_nodes_over_the_loopback_interface(tmp_path):
    """The multi-node command of the README, as two nodes of one rank each on this machine."""
    overrides = ["method=gptq", "quant=w4a16", *QUICK]
    run(compose([*overrides, f"output_dir={tmp_path / 'one'}"]))
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={k}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "train.py", *overrides,
         f"output_dir={tmp_path / 'two'}"], cwd=REPO, env=env_for_ranks(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert_same_result(tmp_path / "one", tmp_path / "two", 1e-3)


# rank 1 dies as its third block begins (the test's stand-in for a killed process or a lost node)
DYING_RANK = """
import os, runpy, sys
import omniq_lightning.pipeline as pipeline
calibrate_block = pipeline.calibrate_block
def dying(loop, i):
    if i == 2 and os.environ["RANK"] == "1":
        os._exit(3)
    return calibrate_block(loop, i)
pipeline.calibrate_block = dying
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_rank_that_dies_is_named_and_the_run_resumes_in_one_process(tmp_path):
    overrides = ["method=gptq", "quant=w4a16", *QUICK, "calib.dist_timeout_minutes=2"]
    out = tmp_path / "run"
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", DYING_RANK, *overrides, f"output_dir={out}"], cwd=REPO,
                              env={**env_for_ranks(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                                   "HYDRA_FULL_ERROR": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (_, err0), _ = [p.communicate(timeout=300) for p in ranks]
    assert ranks[1].returncode == 3
    assert ranks[0].returncode != 0
    assert "RankLostError" in err0 and "another rank stopped answering" in err0, err0[-3000:]
    assert "run the same command again" in err0
    state = json.loads((out / "state.json").read_text())
    assert sorted(state["finished"]) == ["0", "1"]  # rank 0 kept what was finished

    resumed = run(compose([*overrides, f"output_dir={out}"]))  # one process now
    assert [b.get("resumed") for b in resumed["blocks"]] == [1.0, 1.0, None, None, None]
    run(compose([*overrides, f"output_dir={tmp_path / 'one'}"]))
    assert_same_result(tmp_path / "one", out, 1e-3)


def test_rank_0s_refusal_reaches_every_rank_at_once(tmp_path):
    """A folder holding another configuration's run: rank 0 refuses it, and rank 1 stops naming rank 0's error
    instead of waiting for rank 0 at the first exchange."""
    run(compose(["method=rtn", "quant=w4a16", *QUICK, f"output_dir={tmp_path}"]))
    done = torchrun(["--standalone", "--nproc_per_node=2"],
                    ["method=rtn", "quant=w3a16", *QUICK, f"output_dir={tmp_path}"], timeout=120)
    assert done.returncode != 0
    assert "holds a run with a different configuration" in done.stderr
    assert "rank 0 stopped the run: ValueError" in done.stderr, done.stderr[-3000:]


def test_a_followers_run_state_never_writes(tmp_path):
    from omniq_lightning.calib import RunState

    cfg = {"model": {"name": "m"}, "quant": {"w_bits": 4}}
    state = RunState.follow(tmp_path, cfg, ({"0": {"file": "blocks/block_000.safetensors", "sha256": "x"}}, {}))
    assert state.is_finished(0) and not state.is_finished(1)
    state.forget_blocks(0)
    assert not state.is_finished(0) and not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="only rank 0 writes"):
        state.save_block(1, {"w": torch.zeros(1)})


def test_one_process_is_its_own_world():
    assert not distributed.active()
    t = torch.ones(3)
    assert distributed.sum_(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.sum_floats(1.5, 2.0) == [1.5, 2.0]
