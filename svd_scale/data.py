"""Data: prompt/completion records -> tokenized examples with loss on the completion.

Sources:
* a JSONL or CSV file with ``prompt`` and ``completion`` columns (loss on the
  completion only) or a ``text`` column (loss on every token), read with ``datasets``;
* ``builtin:rotten_tomatoes`` / ``builtin:plot_vs_review`` (see ``svd_scale.builtin``).

Built-in data gets a fixed split that does not depend on the training seed:
``test`` (never used for tuning), ``validation`` (for picking learning rates) and
``train``. A user file is held out against ``eval_data`` if given, else against a
fixed 5% (at most 500 examples) of itself.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import builtin

log = logging.getLogger("svd_scale")

SPLIT_SEED = 1234
TEST_SIZE = 500
VAL_SIZE = 500


@dataclass
class Splits:
    train: list
    validation: list
    test: list


def _decoded(p: Path) -> str:
    """The file's text; a byte that is not UTF-8 is named with its line and column."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{p}, line {line}, column {col}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file "
                         "as UTF-8") from None


def _jsonl_records(p: Path, text: str) -> list[dict]:
    import json

    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{p}, line {n}: not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}, line {n}: a JSON {type(row).__name__}, expected an object with 'prompt' and "
                             "'completion' (or 'text')")
        records.append(row)
    return records


def check_records(where: str, records: list[dict]) -> None:
    """Every row has the fields its format needs, as strings (row numbers count from 1)."""
    if not records:
        raise ValueError(f"{where}: no examples")
    cols = set().union(*(r.keys() for r in records[:1000]))
    need = ("prompt", "completion") if {"prompt", "completion"} <= cols else ("text",) if "text" in cols else None
    if need is None:
        raise ValueError(f"{where}: needs 'prompt' and 'completion' columns, or a 'text' column; found {sorted(cols)}")
    for i, r in enumerate(records, 1):
        for key in need:
            if not isinstance(r.get(key), str) or (key != "prompt" and not r[key]):
                got = "missing" if r.get(key) is None else f"{type(r[key]).__name__} {r[key]!r}"[:80]
                raise ValueError(f"{where}, row {i}: {key!r} must be a non-empty string, got {got}")


def _read_file(path: str) -> list[dict]:
    import datasets

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {path!r} does not exist")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"data file {path!r}: expected .jsonl, .json or .csv")
    text = _decoded(p)
    if p.suffix.lower() == ".jsonl" or (kind == "json" and not text.lstrip().startswith("[")):
        records = _jsonl_records(p, text)
    else:
        try:
            records = datasets.load_dataset(kind, data_files=str(p), split="train").to_list() if text.strip() else []
        except Exception as e:  # pyarrow/pandas parse errors: name the file, keep the library's reason
            raise ValueError(f"{p}: could not be read as {kind.upper()} ({type(e).__name__}: {str(e)[:300]})") from None
    check_records(str(p), records)
    return records


def load_splits(spec: str, eval_spec: Optional[str] = None) -> Splits:
    if spec.startswith(builtin.BUILTIN_PREFIX):
        key = spec[len(builtin.BUILTIN_PREFIX):]
        if key not in builtin.BUILTIN_DATA:
            raise ValueError(f"unknown built-in data {spec!r}; known: {[builtin.BUILTIN_PREFIX + k for k in builtin.BUILTIN_DATA]}")
        records = builtin.BUILTIN_DATA[key][0]()
        random.Random(SPLIT_SEED).shuffle(records)
        return Splits(records[TEST_SIZE + VAL_SIZE:], records[TEST_SIZE:TEST_SIZE + VAL_SIZE], records[:TEST_SIZE])
    records = _read_file(spec)
    if eval_spec:
        return Splits(records, [], _read_file(eval_spec))
    if len(records) < 2:
        raise ValueError(f"{spec}: {len(records)} example; at least 2 are needed (one is held out for evaluation "
                         "unless eval_data is given)")
    random.Random(SPLIT_SEED).shuffle(records)
    n = min(500, max(1, len(records) // 20))
    return Splits(records[n:], [], records[:n])


def encode(record: dict, tok, max_length: int) -> dict:
    """Token ids and labels; labels are -100 on the prompt so the loss is on the completion.

    An example longer than ``max_length`` loses the *start of its prompt* (a leading BOS token is
    kept): the completion is what the loss is on, and the end of the prompt is what it answers.
    Cutting from the end instead would drop the label of every long example -- on a task where one
    class is long (plot synopses vs reviews) the model would then see only the other class."""
    if "prompt" in record and record.get("completion") is not None:
        p = tok(record["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(record["completion"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            c = c + [tok.eos_token_id]
        if len(p) + len(c) > max_length:
            head = p[:1] if p and p[0] == getattr(tok, "bos_token_id", None) else []
            tail = max(0, max_length - len(c) - len(head))
            p = (head + (p[-tail:] if tail else []))[: max(0, max_length - len(c))]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
    else:
        ids = tok(record["text"], add_special_tokens=True)["input_ids"][:max_length]
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def tokenized_dataset(records: list, tok, max_length: int, where: str = "training data"):
    """Encoded examples that keep a label the loss can use: one after the first position (a causal LM
    predicts token t from the tokens before it). Examples without one are counted and skipped; if none
    is left, that is an error naming ``train.max_length``, not a run that trains on nothing."""
    import datasets

    enc = [encode(r, tok, max_length) for r in records]
    kept = [e for e in enc if any(l != -100 for l in e["labels"][1:])]
    if not kept:
        raise ValueError(f"{where}: none of the {len(enc)} examples keeps a label token within train.max_length="
                         f"{max_length} (the loss would be on nothing); raise train.max_length")
    if len(kept) < len(enc):
        log.warning("%s: %d of %d examples have no label token within train.max_length=%d and are skipped",
                    where, len(enc) - len(kept), len(enc), max_length)
    return datasets.Dataset.from_list(kept)


@dataclass
class Collator:
    """Right-pads a batch; padded positions are masked and ignored by the loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
