"""One process (or plain data parallel under a launcher): weights whole, transformers' Trainer as is."""
from __future__ import annotations

from .base import Engine


class SingleEngine(Engine):
    name = "single"
