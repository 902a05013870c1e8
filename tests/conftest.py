"""Shared fixtures: tiny models built from configs, and the real SmolLM2 (cached); the checks
every resume / agreement test makes on two runs' outputs."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama(seed=0, vocab=128, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def smollm2_path():
    from svd_scale.builtin import smollm2_path

    return smollm2_path()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, 12), generator=g)


def assert_same_adapter(dir_a, dir_b, atol: float, rtol: float) -> None:
    """Two saved adapters (``<dir>/adapter.safetensors``) hold the same tensor names and values."""
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(d) / "svd_scale_adapter.safetensors")) for d in (dir_a, dir_b))
    assert sorted(x) == sorted(y)
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=atol, rtol=rtol)


def assert_resumed_like_uninterrupted(full: dict, resumed: dict, rel: float, at: int = 5, end: int = 10) -> None:
    """A run resumed from checkpoint-``at`` logs the uninterrupted run's losses at steps ``at+1``..``end``
    (``metrics.json`` dicts of training.run)."""
    import pytest

    assert resumed["resumed_from"].endswith(f"checkpoint-{at}")
    a, b = dict(full["losses"]), dict(resumed["losses"])
    for step in range(at + 1, end + 1):
        assert b[step] == pytest.approx(a[step], rel=rel), step


def free_port() -> int:
    """A free TCP port for a multi-rank launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_llama_with_real_tokenizer(d, tie_word_embeddings: bool = False) -> str:
    """A tiny random Llama with SmolLM2's real tokenizer as a from_pretrained folder (the
    distributed jobs' model: real vocabulary, so the built-in data tokenizes as in the quickstart)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from svd_scale.builtin import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def assert_same_peft_export(dir_a, dir_b, base, tmp, atol: float, rtol: float) -> None:
    """Two saved adapters export (``svd_scale.export_peft``) to the same PEFT tensors: an adapter saved
    under ZeRO-3 or FSDP2 serves like the single-process one."""
    import svd_scale
    from safetensors.torch import load_file

    outs = [Path(tmp) / f"peft_export_{i}" for i in (0, 1)]
    reports = [svd_scale.export_peft(str(d), str(o), base=str(base)) for d, o in zip((dir_a, dir_b), outs)]
    assert reports[0]["form"] == reports[1]["form"] and reports[0]["exact"] and reports[1]["exact"]
    x, y = (load_file(str(o / "adapter_model.safetensors")) for o in outs)
    assert sorted(x) == sorted(y) and x
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=atol, rtol=rtol)


def assert_chat_run_like_one_process(sharded_dir, model_dir, tmp, extra: tuple) -> None:
    """A 2-rank run on tests/dist/chat_data's messages file logs the single-process run's training losses
    (same global batch); its held-out loss (Trainer evaluation, batched per rank) is close."""
    import json

    import pytest

    sys.path.insert(0, str(ROOT / "tests" / "dist"))
    import chat_data

    from svd_scale.config import load_config
    from svd_scale.training import run

    got = json.loads((Path(sharded_dir) / "metrics.json").read_text())
    ref = run(load_config(None, (f"model={model_dir}", f"data={chat_data.write(Path(tmp) / 'chat.jsonl')}", *extra,
                                 *chat_data.ARGS, f"train.output_dir={Path(tmp) / 'chat_single'}")))
    assert len(got["losses"]) == len(ref["losses"]) == 3 and len(got["eval_losses"]) == len(ref["eval_losses"]) == 1
    for (_, a), (_, b) in zip(got["losses"], ref["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert got["eval_losses"][0][1] == pytest.approx(ref["eval_losses"][0][1], rel=5e-2)
