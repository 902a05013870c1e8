"""Tokenization puts the loss on the completion; the built-in split is fixed."""
import json


from svd_scale.data import Collator, encode, load_splits


class _Tok:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + (ord(c) % 50) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_prompt_is_masked_and_completion_is_learned():
    e = encode({"prompt": "ab", "completion": "c"}, _Tok(), 64)
    assert e["input_ids"] == [1, 10 + ord("a") % 50, 10 + ord("b") % 50, 10 + ord("c") % 50, 2]
    assert e["labels"] == [-100, -100, -100, 10 + ord("c") % 50, 2]
    t = encode({"text": "ab"}, _Tok(), 64)
    assert t["labels"] == t["input_ids"]
    assert len(encode({"prompt": "abcdef", "completion": "g"}, _Tok(), 4)["input_ids"]) == 4


def test_a_long_example_keeps_its_completion_and_the_end_of_its_prompt():
    """Too long: the prompt loses its start (BOS kept), never the label the loss is on."""
    tok, t = _Tok(), (lambda ch: 10 + ord(ch) % 50)
    tok.bos_token_id = 1
    e = encode({"prompt": "abcdefgh", "completion": "z"}, tok, 5)
    assert e["input_ids"] == [1, t("g"), t("h"), t("z"), 2]
    assert e["labels"] == [-100, -100, -100, t("z"), 2]
    no_bos = encode({"prompt": "abcdefgh", "completion": "z"}, type("T", (_Tok,), {"bos_token_id": None})(), 4)
    assert no_bos["labels"][-2:] == [t("z"), 2] and len(no_bos["input_ids"]) == 4


def test_collator_pads_and_masks():
    b = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_builtin_split_is_fixed_and_disjoint():
    a, b = load_splits("builtin:rotten_tomatoes"), load_splits("builtin:rotten_tomatoes")
    assert [r["prompt"] for r in a.test] == [r["prompt"] for r in b.test]
    assert len(a.test) == 500 and len(a.validation) == 500 and len(a.train) > 10000
    test = {r["prompt"] for r in a.test}
    assert not test & {r["prompt"] for r in a.train} and not test & {r["prompt"] for r in a.validation}
    assert {r["completion"] for r in a.test} == {" positive", " negative"}


def test_jsonl_file_and_bad_columns(tmp_path):
    import pytest
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": " a"}) for i in range(40)))
    s = load_splits(str(p))
    assert len(s.train) == 40 and not s.test  # nothing is held out unless asked
    s = load_splits(str(p), eval_fraction=0.1)
    assert len(s.train) == 36 and len(s.test) == 4 and not {r["prompt"] for r in s.train} & {r["prompt"] for r in s.test}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}))
    with pytest.raises(ValueError, match=r"found columns \['question'\]; expected those of one format: messages"):
        load_splits(str(bad))


def test_plot_vs_review_is_balanced_and_split():
    from svd_scale.builtin import plot_vs_review_records

    recs = plot_vs_review_records()
    labels = [r["completion"] for r in recs]
    assert labels.count(" plot") == labels.count(" review") > 1000
    s = load_splits("builtin:plot_vs_review")
    assert len(s.test) == 500 and len(s.validation) == 500
    assert not {r["prompt"] for r in s.test} & {r["prompt"] for r in s.train}


def test_tokenized_data_is_cached_by_content_and_settings_and_workers_agree(tmp_path, monkeypatch):
    """A second tokenization of the same rows with the same tokenizer and max_length reads the cache
    (encode is never called); another max_length or an edited row makes a new file; 2 worker
    processes give the same examples as one, in the same order."""
    import svd_scale.data as data

    rows = [{"prompt": f"p{i} " * (i % 7), "completion": f" c{i}"} for i in range(300)]
    first = data.tokenized_dataset(rows, _Tok(), 16, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("tokenized-*.arrow"))
    assert len(files) == 1 and len(first) == 300

    def refuse(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data, "encode", refuse)
    again = data.tokenized_dataset(rows, _Tok(), 16, cache_dir=tmp_path)
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    monkeypatch.undo()
    assert data.tokenized_dataset(rows, _Tok(), 12, cache_dir=tmp_path)["input_ids"] != first["input_ids"]
    edited = [dict(r) for r in rows]
    edited[5]["completion"] = " other"
    assert data.tokenized_dataset(edited, _Tok(), 16, cache_dir=tmp_path)["input_ids"][5] != first["input_ids"][5]
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 3
    two = data.tokenized_dataset(rows, _Tok(), 16, num_proc=2)
    assert two["input_ids"] == first["input_ids"] and two["labels"] == first["labels"]
    assert first["input_ids"][3] == encode(rows[3], _Tok(), 16)["input_ids"]  # the cache holds what encode makes


def test_a_broken_csv_is_refused_naming_its_line(tmp_path):
    """datasets wraps pandas' parse error in a generic one; the message keeps the line it names."""
    import pytest

    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,completion\n"a",b\n"c","d","e"\nf,g\n')
    with pytest.raises(ValueError, match=r"bad\.csv: could not be read as csv \(ParserError: .*Expected 2 fields in line 3, saw 3"):
        load_splits(str(bad))
