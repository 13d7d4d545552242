"""Tokenizer loading. Real names go to Hugging Face; `psamf:tiny` is the packaged synthetic vocabulary.

`psamf:tiny` is a WordPiece vocabulary (psamf/assets/tiny-vocab.txt) covering the synthetic corpora's
lexicon, plus single characters and `##` continuations so that any lower-case word still tokenises.
It is loaded with the real `BertTokenizerFast`, so nothing here is a stand-in for tokenisation.
"""

from __future__ import annotations

import hashlib
from importlib import resources

TINY = "psamf:tiny"


def tiny_vocab_path() -> str:
    return str(resources.files("psamf") / "assets" / "tiny-vocab.txt")


def load_tokenizer(name: str):
    """A fast BERT-family tokenizer by hub name, local path, or `psamf:tiny`."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if name == TINY:
        with open(tiny_vocab_path(), encoding="utf-8") as f:
            vocab = {tok: i for i, tok in enumerate(line.rstrip("\n") for line in f if line.strip())}
        # transformers 5 takes the vocabulary itself; 4.x takes a file path
        try:
            return BertTokenizerFast(vocab=vocab, do_lower_case=True)
        except TypeError:
            return BertTokenizerFast(vocab_file=tiny_vocab_path(), do_lower_case=True)
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except OSError as e:
        raise ValueError(
            f"tokenizer {name!r} could not be loaded: give a local directory or a hub name reachable from "
            f"this machine (or {TINY!r} for the synthetic data). Cause: {e}"
        ) from None


def vocab_sha256(tokenizer) -> str:
    """A stable hash of a tokenizer's vocabulary (token -> id), recorded in shard manifests."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for tok, idx in items:
        h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()
