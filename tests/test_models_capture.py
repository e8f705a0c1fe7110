"""Adapters and block capture: replaying blocks standalone reproduces the full model exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, Qwen2Config

from omniq_lightning.calib import ActivationCache
from omniq_lightning.models import adapter_for, load_model, supported_model_types
from tests.conftest import replay


def final_block_output(model, adapter, ids):
    """The full model's last-block output (the input of the final norm), via a forward hook."""
    out = {}
    handle = adapter.blocks(model)[-1].register_forward_hook(
        lambda m, a, o: out.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return out["h"]


def assert_replay_exact(model, adapter, n=3, seqlen=32, where="cpu", tmp_path=None):
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))
    cache = ActivationCache(n, (seqlen, model.config.hidden_size), torch.float32, "cpu", where=where,
                            path=None if tmp_path is None else tmp_path / "inps.bin")
    contexts = adapter.capture(model, (ids[i : i + 1] for i in range(n)), cache, "cpu")
    replayed = replay(model, adapter, cache.all(), contexts)
    expected = torch.cat([final_block_output(model, adapter, ids[i : i + 1]) for i in range(n)])
    assert (replayed - expected).abs().max().item() == 0.0
    cache.close()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stories260k_block_replay_is_exact(stories_dir, attn):
    loaded = load_model(str(stories_dir), dtype="float32", attn_implementation=attn)
    assert loaded.model.config._attn_implementation == attn
    assert_replay_exact(loaded.model, loaded.adapter)


def test_replay_is_exact_through_a_disk_cache(stories, tmp_path):
    assert_replay_exact(stories.model, stories.adapter, where="disk", tmp_path=tmp_path)


def tiny(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_tiny_opt_block_replay_is_exact():
    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    model = tiny(cfg)
    assert_replay_exact(model, adapter_for("opt"))


def test_tiny_qwen2_block_replay_is_exact():
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny(cfg)
    assert_replay_exact(model, adapter_for("qwen2"))


def test_unsupported_architecture_lists_supported_types():
    with pytest.raises(ValueError, match="unsupported architecture: model_type 'gpt2'") as err:
        adapter_for("gpt2")
    for t in supported_model_types():
        assert t in str(err.value)


def test_missing_model_files_name_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found .*looked in.*OMNIQ_MODELS_DIR"):
        load_model("no-such-model", models_dir=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model("empty", models_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no model.gguf"):
        load_model("empty", models_dir=str(tmp_path), gguf_file="model.gguf")


def test_unsupported_local_architecture_fails_before_loading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture: model_type 'gpt2'"):
        load_model(str(tmp_path))


def test_model_loads_in_the_configured_dtype_without_remote_code(stories_dir):
    loaded = load_model(str(stories_dir), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype"):
        load_model(str(stories_dir), dtype="fp8")


@pytest.mark.parametrize("where", ["cpu", "pinned", "device"])
def test_cache_backends_share_one_interface(where):
    cache = ActivationCache(4, (3, 2), torch.float16, "cpu", where=where)
    for i in range(4):
        cache[i] = torch.full((3, 2), float(i))
    assert cache[2].dtype == torch.float16 and cache[2][0, 0].item() == 2.0
    assert cache.batch([3, 1])[:, 0, 0].tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="calib.cache"):
        ActivationCache(1, (1,), torch.float32, "cpu", where="gpu")
