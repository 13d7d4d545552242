"""Tokenizer loading. Real names go to Hugging Face; `psamf:tiny` is the packaged synthetic vocabulary.

`psamf:tiny` is a WordPiece vocabulary (psamf/assets/tiny-vocab.txt) covering the synthetic corpora's
lexicon, plus single characters and `##` continuations so that any lower-case word still tokenises.
It is loaded with the real `BertTokenizerFast`, so nothing here is a stand-in for tokenisation.
"""

from __future__ import annotations

import hashlib
import os
import socket
from importlib import resources
from urllib.parse import urlparse

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
    how = (f"give a local copy (--tokenizer /path/to/{name.rsplit('/', 1)[-1]}, a directory holding "
           f"tokenizer.json or vocab.txt), or --tokenizer {TINY} for the synthetic data")
    if os.path.isdir(name):
        return _from_pretrained(AutoTokenizer, name, how, local_files_only=True)
    try:  # the local Hugging Face cache first: no network at all when it is there
        return AutoTokenizer.from_pretrained(name, use_fast=True, local_files_only=True)
    except (OSError, ValueError):
        pass
    reason = _hub_unreachable()
    if reason:  # fail fast: the hub client would otherwise retry for about a minute
        raise ValueError(f"tokenizer {name!r} is not in the local Hugging Face cache and {reason}; {how}")
    return _from_pretrained(AutoTokenizer, name, how, local_files_only=False)


def _from_pretrained(auto, name: str, how: str, *, local_files_only: bool):
    try:
        return auto.from_pretrained(name, use_fast=True, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {name!r} could not be loaded ({e}); {how}") from None


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used from here (offline mode, no route to it), or None.

    One TCP connect to the configured endpoint (HF_ENDPOINT), so that a machine without network is told
    so in seconds instead of after the hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (no downloads)"
    u = urlparse(constants.ENDPOINT)
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"the hub at {constants.ENDPOINT} cannot be reached from this machine ({e})"


def vocab_sha256(tokenizer) -> str:
    """A stable hash of a tokenizer's vocabulary (token -> id), recorded in shard manifests."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for tok, idx in items:
        h.update(f"{idx}\t{tok}\n".encode())
    return h.hexdigest()
