"""Data: any 🤗 Datasets source -> tokenized examples with the loss where it belongs.

Sources (``data``, ``eval_data``), all read through ``datasets``:
* a local file (.jsonl, .json, .csv, .parquet, .arrow) or a folder of such files;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a Hub dataset id (``data_subset``, ``data_split``, ``data_revision``), from the local cache when offline;
* ``builtin:rotten_tomatoes`` / ``builtin:plot_vs_review`` (see ``svd_scale.builtin``).

Rows are in one of the formats of :mod:`svd_scale.formats` (chat ``messages``, ShareGPT, Alpaca,
prompt/completion, text), recognised by their columns and checked row by row before any model loads.
With ``data_streaming`` the rows are read lazily (``IterableDataset``): the first :data:`STREAM_CHECK_ROWS`
are checked up front, the rest as training reads them.

Built-in data gets a fixed split that does not depend on the training seed: ``test`` (never used for
tuning), ``validation`` (for picking learning rates) and ``train``. A user's data is held out only when
asked: ``eval_data`` (another source), or ``eval_fraction`` of the data (fixed seed); otherwise every
row trains.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import builtin, formats

log = logging.getLogger("svd_scale")

SPLIT_SEED = 1234
TEST_SIZE = 500
VAL_SIZE = 500
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


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
            raise ValueError(f"{p}, line {n}: a JSON {type(row).__name__}, expected an object with the columns of "
                             f"one of: {formats.describe_formats()}")
        records.append(row)
    return records


def check_records(where: str, records: list[dict]) -> str:
    """The rows' format (:mod:`svd_scale.formats`); every row is checked (row numbers count from 1)."""
    if not records:
        raise ValueError(f"{where}: no examples")
    cols = set().union(*(r.keys() for r in records[:1000]))
    fmt = formats.detect(cols)
    if fmt is None:
        raise ValueError(f"{where}: found columns {sorted(cols)}; expected those of one format: "
                         f"{formats.describe_formats()}")
    for i, r in enumerate(records, 1):
        problem = formats.row_problem(r, fmt)
        if problem:
            raise ValueError(f"{where}, row {i}: {problem}")
    return fmt


def _read_file(p: Path) -> list[dict]:
    import datasets

    kind = FILE_BUILDERS.get(p.suffix.lower())
    if kind is None:
        raise ValueError(f"data file {str(p)!r}: expected one of {sorted(FILE_BUILDERS)}")
    if kind in ("json", "csv"):
        text = _decoded(p)
        if p.suffix.lower() == ".jsonl" or (kind == "json" and not text.lstrip().startswith("[")):
            return _jsonl_records(p, text)
        if not text.strip():
            return []
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train").to_list()
    except Exception as e:  # pyarrow/pandas parse errors: name the file, keep the library's reason
        inner = e  # datasets wraps the parser's error (which names the line) in a generic one
        while (inner.__cause__ or inner.__context__) is not None:
            inner = inner.__cause__ or inner.__context__
        reason = str(inner).strip()[:300]
        raise ValueError(f"{p}: could not be read as {kind} ({type(inner).__name__}: {reason})") from None


def read_source(spec: str, split: str = "train", subset: Optional[str] = None, revision: Optional[str] = None,
                streaming: bool = False):
    """The rows of a file, a saved dataset, a folder of files or a Hub dataset (module docstring); with
    ``streaming`` (``data_streaming``) the source as a ``datasets.IterableDataset``, read as training consumes it."""
    import datasets

    p = Path(spec)
    if streaming and spec.startswith(builtin.BUILTIN_PREFIX):
        raise ValueError(f"data_streaming: {spec!r} is built-in data (held in memory); streaming is for files, "
                         "folders and Hub datasets")
    if p.is_file():
        if not streaming:
            return _read_file(p)
        kind = FILE_BUILDERS.get(p.suffix.lower())
        if kind is None:
            raise ValueError(f"data file {str(p)!r}: expected one of {sorted(FILE_BUILDERS)}")
        return datasets.load_dataset(kind, data_files=str(p), split="train", streaming=True)
    if p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{spec}: no split {split!r}; it has {sorted(ds)} (set data_split)")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds.to_list()
    if not p.exists() and (spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_BUILDERS):
        raise FileNotFoundError(f"data {spec!r} does not exist")
    try:  # a folder of data files, or a Hub id (read from the local cache when offline)
        ds = datasets.load_dataset(spec, subset, split=split, revision=revision, streaming=streaming)
        return ds if streaming else ds.to_list()
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise kind(f"data {spec!r} (split {split!r}{f', subset {subset!r}' if subset else ''}) could not be "
                   f"loaded: {type(e).__name__}: {str(e)[:400]}") from None


#: rows of a stream checked before any model loads (the rest are checked as they are read)
STREAM_CHECK_ROWS = 1000


def load_splits(spec: str, eval_spec: Optional[str] = None, *, split: str = "train", eval_split: str = "test",
                subset: Optional[str] = None, revision: Optional[str] = None, eval_fraction: float = 0.0,
                streaming: bool = False, eval_subset: Optional[str] = None, eval_revision: Optional[str] = None) -> Splits:
    """Train rows and held-out rows. ``eval_spec`` is read with ``eval_subset``/``eval_revision``; when it names
    the same source as ``spec`` and those are unset, with ``spec``'s (another split of the same dataset)."""
    if eval_spec == spec:
        eval_subset = subset if eval_subset is None else eval_subset
        eval_revision = revision if eval_revision is None else eval_revision
    if streaming:  # train rows as a stream; held-out data (if any) is small and read whole
        if eval_fraction:
            raise ValueError("data_streaming: eval_fraction would need the whole stream first; give eval_data instead")
        stream = read_source(spec, split, subset, revision, streaming=True)
        check_records(spec, list(stream.take(STREAM_CHECK_ROWS)))
        held = read_source(eval_spec, eval_split, eval_subset, eval_revision) if eval_spec else []
        if eval_spec:
            check_records(eval_spec, held)
        return Splits(stream, [], held)
    if spec.startswith(builtin.BUILTIN_PREFIX):
        key = spec[len(builtin.BUILTIN_PREFIX):]
        if key not in builtin.BUILTIN_DATA:
            raise ValueError(f"unknown built-in data {spec!r}; known: {[builtin.BUILTIN_PREFIX + k for k in builtin.BUILTIN_DATA]}")
        records = builtin.BUILTIN_DATA[key][0]()
        random.Random(SPLIT_SEED).shuffle(records)
        n_test, n_val = builtin.BUILTIN_SPLITS.get(key, (TEST_SIZE, VAL_SIZE))
        return Splits(records[n_test + n_val:], records[n_test:n_test + n_val], records[:n_test])
    records = read_source(spec, split, subset, revision)
    check_records(spec, records)
    if eval_spec:
        held = read_source(eval_spec, eval_split, eval_subset, eval_revision)
        check_records(eval_spec, held)
        return Splits(records, [], held)
    if not eval_fraction:
        return Splits(records, [], [])
    if len(records) < 2:
        raise ValueError(f"{spec}: {len(records)} example; eval_fraction={eval_fraction} needs at least 2 (one is held out)")
    random.Random(SPLIT_SEED).shuffle(records)
    n = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
    return Splits(records[n:], [], records[:n])


def encode(record: dict, tok, max_length: int, fmt: Optional[str] = None, chat: bool = False) -> dict:
    """Token ids and labels of one row (``fmt``: its format, detected from its keys if not given; ``chat``:
    prompt/completion rows as one chat turn). Chats: :func:`svd_scale.formats.encode_chat`. Otherwise
    labels are -100 on the prompt so the loss is on the completion.

    An example longer than ``max_length`` loses the *start of its prompt* (a leading BOS token is
    kept): the completion is what the loss is on, and the end of the prompt is what it answers.
    Cutting from the end instead would drop the label of every long example -- on a task where one
    class is long (plot synopses vs reviews) the model would then see only the other class."""
    fmt = fmt or formats.detect(record.keys())
    if fmt in formats.CHAT or (chat and fmt == "prompt_completion"):
        return formats.encode_chat(formats.to_messages(record, fmt), tok, max_length)
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


#: bump when :func:`encode` changes what it makes of a row: cached tokenizations of older versions are not reused
ENCODE_VERSION = 1


def tokenize_cache_key(records: list, tok, max_length: int, fmt: Optional[str], chat: bool) -> str:
    """What a tokenized copy depends on: every row's content, the tokenizer (its whole state, as
    ``datasets`` hashes it for ``map``), ``max_length``, the format, ``chat``, :data:`ENCODE_VERSION` and the
    versions of transformers and tokenizers."""
    import hashlib
    import json

    import tokenizers
    import transformers
    from datasets.fingerprint import Hasher

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    versions = (transformers.__version__, tokenizers.__version__)  # an upgrade may split the same text otherwise
    return Hasher.hash([h.hexdigest(), Hasher.hash(tok), max_length, fmt, chat, ENCODE_VERSION, versions])


def tokenized_dataset(records: list, tok, max_length: int, where: str = "training data", chat: bool = False,
                      num_proc: Optional[int] = None, cache_dir: Optional[Path] = None):
    """Encoded examples that keep a label the loss can use: one after the first position (a causal LM
    predicts token t from the tokens before it). Examples without one are counted and skipped; if none
    is left, that is an error naming ``train.max_length``, not a run that trains on nothing.

    Tokenized with ``datasets.Dataset.map`` (batched; ``num_proc`` worker processes). With ``cache_dir``
    the result is an Arrow file named by :func:`tokenize_cache_key` there, written by ``datasets``
    through a temporary file and a rename: a later run -- or another rank, when the main process
    tokenizes first (``training.run``) -- memory-maps it instead of tokenizing again."""
    import uuid

    import datasets

    if isinstance(records, datasets.IterableDataset):
        return _tokenized_stream(records, tok, max_length, where, chat)
    fmt = formats.detect(set().union(*(r.keys() for r in records[:1000]))) if records else None

    def encode_batch(batch):
        enc = [encode(records[i], tok, max_length, fmt, chat) for i in batch["row"]]
        enc = [e for e in enc if any(l != -100 for l in e["labels"][1:])]
        return {"input_ids": [e["input_ids"] for e in enc], "labels": [e["labels"] for e in enc]}

    index = datasets.Dataset.from_dict({"row": list(range(len(records)))})
    path, key = None, uuid.uuid4().hex  # our own fingerprint: datasets would hash the closure (all rows) each time
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        key = tokenize_cache_key(records, tok, max_length, fmt, chat)
        path = Path(cache_dir) / f"tokenized-{key}.arrow"
    num_proc = num_proc if len(records) > 1 else None
    # with num_proc workers datasets writes one file per worker, named after path
    hit = path is not None and (path.is_file() or any(path.parent.glob(f"{path.stem}_*_of_*.arrow")))
    kept = index.map(encode_batch, batched=True, num_proc=num_proc, remove_columns=["row"],
                     cache_file_name=None if path is None else str(path), load_from_cache_file=True,
                     new_fingerprint=key, desc=f"tokenizing {where}")
    if path is not None:
        log.info("%s: tokenized examples %s %s%s", where, "read from" if hit else "written to", path,
                 f" (one file per worker, {num_proc})" if num_proc and num_proc > 1 else "")
    if not len(kept):
        raise ValueError(f"{where}: none of the {len(records)} examples keeps a label token within train.max_length="
                         f"{max_length} (the loss would be on nothing); raise train.max_length")
    if len(kept) < len(records):
        log.warning("%s: %d of %d examples have no label token within train.max_length=%d and are skipped",
                    where, len(records) - len(kept), len(records), max_length)
    return kept


def _tokenized_stream(stream, tok, max_length: int, where: str, chat: bool):
    """A stream tokenized as it is read (``IterableDataset.map``, lazy): each row is checked first, and a bad
    one stops the run naming its row number; rows without a label token are skipped (counted in the log)."""
    head = list(stream.take(STREAM_CHECK_ROWS))  # the rows load_splits checked: the same format
    fmt = formats.detect(set().union(*(r.keys() for r in head)))
    columns = list(stream.column_names or set().union(*(r.keys() for r in head)))
    skipped = [0]

    def encode_batch(batch, idx):
        ids, labels = [], []
        for n, i in enumerate(idx):
            row = {k: v[n] for k, v in batch.items()}
            problem = formats.row_problem(row, fmt)
            if problem:
                raise ValueError(f"{where}, row {i + 1}: {problem}")
            e = encode(row, tok, max_length, fmt, chat)
            if any(l != -100 for l in e["labels"][1:]):
                ids.append(e["input_ids"])
                labels.append(e["labels"])
            else:
                skipped[0] += 1
                if skipped[0] in (1, 10, 100, 1000):
                    log.warning("%s: %d streamed example(s) so far have no label token within train.max_length=%d "
                                "and are skipped", where, skipped[0], max_length)
        return {"input_ids": ids, "labels": labels}

    return stream.map(encode_batch, batched=True, with_indices=True, remove_columns=columns)


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
