"""Hugging Face data conventions: every row format (chat messages, ShareGPT, Alpaca, prompt/completion,
text), every source (a file of each type, a folder, a save_to_disk folder, a Hub-style id), held-out data
only when asked, eval loss, HF argument names, TensorBoard, and launchers that would skip the project's path."""
import json

import pytest
import torch

from svd_scale import formats
from svd_scale.data import encode, load_splits, read_source
from conftest import save_tiny_llama_with_real_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from svd_scale.builtin import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def _learned(e, tok):
    return tok.decode([t for t, l in zip(e["input_ids"], e["labels"]) if l != -100])


def test_chat_rows_use_the_template_and_learn_only_the_assistant_turns(tok):
    e = encode({"messages": CHAT}, tok, 512)
    assert e["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert _learned(e, tok) == "Four.<|im_end|>\nSix.<|im_end|>\n"  # answers and their end-of-turn, nothing else
    assert [l for l in e["labels"] if l != -100] == [t for t, l in zip(e["input_ids"], e["labels"]) if l != -100]


def test_sharegpt_and_alpaca_rows_encode_like_the_same_chat(tok):
    share = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Two plus two?"},
                               {"from": "gpt", "value": "Four."}]}
    alpaca = {"system": "Be brief.", "instruction": "Two plus two?", "input": "", "output": "Four."}
    ref = encode({"messages": CHAT[:3]}, tok, 512)
    assert encode(share, tok, 512) == ref == encode(alpaca, tok, 512)
    with_input = encode({"instruction": "Add:", "input": "2 + 2", "output": "4"}, tok, 512)
    assert "Add:\n\n2 + 2" in tok.decode(with_input["input_ids"]) and _learned(with_input, tok) == "4<|im_end|>\n"


def test_prompt_completion_through_the_chat_template_when_asked(tok):
    row = {"prompt": "Review: great fun.\nSentiment:", "completion": " positive"}
    raw, chat = encode(row, tok, 512), encode(row, tok, 512, chat=True)
    assert _learned(raw, tok) == " positive" + tok.eos_token and "<|im_start|>" not in tok.decode(raw["input_ids"])
    assert "<|im_start|>user" in tok.decode(chat["input_ids"]) and _learned(chat, tok) == "positive<|im_end|>\n"


ROWS = [{"prompt": f"q{i}", "completion": " a" if i % 2 else " b"} for i in range(10)]


@pytest.mark.parametrize("kind", ["jsonl", "json_array", "csv", "parquet", "arrow", "folder", "saved", "saved_dict"])
def test_every_local_source_reads_the_same_rows(kind, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / "d"
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif kind == "json_array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind in ("csv", "parquet"):
        path = tmp_path / f"d.{kind}"
        getattr(ds, f"to_{kind}")(str(path))
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif kind == "folder":  # laid out like a Hub dataset repository: loaded by the same load_dataset(id) call
        (path / "data").mkdir(parents=True)
        ds.select(range(6)).to_json(str(path / "data" / "train-0.jsonl"))
        ds.select(range(6, 10)).to_json(str(path / "data" / "train-1.jsonl"))
    elif kind == "saved":
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(path))
    assert sorted(read_source(str(path)), key=lambda r: r["prompt"]) == sorted(ROWS, key=lambda r: r["prompt"])
    if kind == "saved_dict":
        s = load_splits(str(path), str(path))  # the same DatasetDict: train split to train, test split held out
        assert len(s.train) == 10 and len(s.test) == 2
        with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
            read_source(str(path), split="validation")


def test_a_chat_file_trains_with_eval_loss_hf_names_and_tensorboard(tmp_path):
    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ["yes", "no", "maybe", "never", "always", "often"] * 5]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    m = run(load_config(None, (f"model={model}", f"data={tmp_path / 'chat.jsonl'}", "rank=4", "train.max_steps=4",
                               "train.per_device_train_batch_size=4", "learning_rate=1e-2", "eval_fraction=0.2",
                               "train.eval_steps=2", "train.logging_steps=1", "train.report_to=tensorboard",
                               "train.run_name=chat-test", "train.hf_args={max_grad_norm: 0.5, save_total_limit: 1}",
                               "train.max_length=64", f"train.output_dir={out}")))
    assert m["batch_size"] == 4 and m["lr"] == 1e-2 and len(m["eval_losses"]) == 2
    assert all(torch.isfinite(torch.tensor(l)) for _, l in m["eval_losses"]) and m["eval_losses"][0][0] == 2
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_hf_args_reach_training_arguments_and_accelerate_plugins_are_refused(monkeypatch, tmp_path):
    from svd_scale import engines
    from svd_scale.config import load_config
    from svd_scale.training import run, training_arguments

    cfg = load_config(None, ("train.hf_args={optim: adafactor, max_grad_norm: 0.25, dataloader_num_workers: 1}",
                             "train.num_epochs=2"))
    args = training_arguments(cfg, engines.create(cfg))
    assert args.optim == "adafactor" and args.max_grad_norm == 0.25 and args.num_train_epochs == 2 and args.max_steps == -1
    assert args.dataloader_num_workers == 1  # hf_args win over svd_scale's own choices
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("train:\n  learning_rate: 0.5\n")
    assert load_config(str(yaml_cfg), ("lr=1e-4",)).train.lr == 1e-4  # an override replaces either spelling
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match=r"deepspeed launch/train.py"):
        run(load_config(None, ()))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"train.engine=fsdp2"):
        run(load_config(None, ()))


def test_a_deepspeed_json_with_auto_precision_follows_train_precision(tmp_path):
    from svd_scale.engines.zero3 import run_config

    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}))
    assert run_config(str(tmp_path / "ds.json"), "bf16")["torch_autocast"]["enabled"] is True
    assert "bf16" not in run_config(str(tmp_path / "ds.json"), "fp32")
    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="would cast the fp32 trainables"):
        run_config(str(tmp_path / "ds.json"), "bf16")


def test_format_detection_names_what_it_accepts():
    assert formats.detect({"messages", "id"}) == "messages" and formats.detect({"instruction", "output"}) == "alpaca"
    assert formats.detect({"conversations"}) == "sharegpt" and formats.detect({"text"}) == "text"
    assert formats.detect({"question", "answer"}) is None


def test_packed_batches_train_exactly_like_padded_ones(tmp_path):
    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    args = (f"model={model}", "rank=4", "train.max_steps=3", "train.batch_size=4", "train.max_length=48",
            "train.eval_examples=0", "train.logging_steps=1", "train.lr=1e-2")
    packed = run(load_config(None, (*args, "train.packing=true", f"train.output_dir={tmp_path / 'p'}")))
    padded = run(load_config(None, (*args, f"train.output_dir={tmp_path / 'u'}")))  # auto: sdpa pads (cheaper)
    assert packed["packing"] is True and padded["packing"] is False
    for (_, a), (_, b) in zip(packed["losses"], padded["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    from conftest import assert_same_adapter
    assert_same_adapter(tmp_path / "p" / "adapter", tmp_path / "u" / "adapter", atol=1e-6, rtol=1e-5)


def test_a_streamed_file_trains_like_the_same_file_read_whole_and_a_bad_row_stops_it(tmp_path):
    """data_streaming: the rows come through datasets' IterableDataset, tokenized as they are read; with
    the in-memory run reading its rows in order too, losses and adapter are the same. A bad row after the
    first 1000 (which are checked up front) stops the run naming the row."""
    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    rows = [{"prompt": f"Review {i}: {'a fine' if i % 3 else 'a dull'} film.", "completion": " positive" if i % 3 else " negative"}
            for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = (f"model={model}", f"data={tmp_path / 'd.jsonl'}", "rank=4", "train.max_steps=3", "train.batch_size=4",
            "train.max_length=32", "train.eval_examples=0", "train.logging_steps=1", "train.lr=1e-2", "data_cache=false")
    streamed = run(load_config(None, (*args, "data_streaming=true", f"train.output_dir={tmp_path / 's'}")))
    whole = run(load_config(None, (*args, "train.hf_args={train_sampling_strategy: sequential}",
                                   f"train.output_dir={tmp_path / 'w'}")))
    assert len(streamed["losses"]) == 3
    for (_, a), (_, b) in zip(streamed["losses"], whole["losses"]):
        assert a == pytest.approx(b, rel=1e-6)
    from conftest import assert_same_adapter
    assert_same_adapter(tmp_path / "s" / "adapter", tmp_path / "w" / "adapter", atol=1e-7, rtol=1e-6)

    bad = rows * 30 + [{"prompt": "no completion here"}]  # row 1201, beyond the rows checked up front
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in bad))
    with pytest.raises(ValueError, match=r"bad.jsonl, row 1201: "):
        run(load_config(None, (*args[:1], f"data={tmp_path / 'bad.jsonl'}", *args[2:], "data_streaming=true",
                               "train.max_steps=40", "train.batch_size=40", "train.max_length=12",
                               f"train.output_dir={tmp_path / 'b'}")))
    with pytest.raises(ValueError, match="eval_fraction would need the whole stream"):
        load_splits(str(tmp_path / "d.jsonl"), streaming=True, eval_fraction=0.1)
    with pytest.raises(ValueError, match="set train.max_steps instead"):
        load_config(None, ("data_streaming=true", "train.num_epochs=1"))


def test_eval_data_takes_its_own_subset_and_inherits_only_from_the_same_dataset(tmp_path):
    """A Hub-style folder with two configurations: eval_data from another dataset is not read with the
    training data's subset; from the same dataset (another split) it is, unless eval_data_subset says otherwise."""
    def rows(tag, n):
        return "\n".join(json.dumps({"prompt": f"{tag} {i}", "completion": f" {tag}"}) for i in range(n))

    hub = tmp_path / "hub"
    for cfg in ("a", "b"):
        (hub / cfg).mkdir(parents=True)
        (hub / cfg / "train.jsonl").write_text(rows(f"{cfg}-train", 6))
        (hub / cfg / "test.jsonl").write_text(rows(f"{cfg}-test", 3))
    (hub / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
        f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("a", "b")) + "---\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "test.jsonl").write_text(rows("other", 4))
    s = load_splits(str(hub), str(other), subset="a", eval_split="test")
    assert s.train[0]["completion"] == " a-train" and [r["completion"] for r in s.test] == [" other"] * 4
    same = load_splits(str(hub), str(hub), subset="a", eval_split="test")
    assert [r["completion"] for r in same.test] == [" a-test"] * 3
    mixed = load_splits(str(hub), str(hub), subset="a", eval_split="test", eval_subset="b")
    assert [r["completion"] for r in mixed.test] == [" b-test"] * 3
