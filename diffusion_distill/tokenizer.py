"""A small CLIP tokenizer built in code, for offline pipelines.

CLIPTokenizer needs a ``vocab.json`` and ``merges.txt``. Here the vocabulary is the 256
byte-level characters (each also with the end-of-word mark) plus one merge chain per word of
the given word list, so that every known word becomes a single token and anything else still
tokenizes, character by character. Saved with the pipeline, it loads with plain transformers.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile


def _bytes_to_unicode() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest are shifted.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging as CLIPTokenizer does it: always the lowest-ranked pair first."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i)
                 for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def make_clip_tokenizer(words: list[str], max_length: int = 77):
    """A CLIPTokenizer whose vocabulary holds ``words`` as whole tokens."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab_list)
    for word in dict.fromkeys(w.lower() for w in words):
        # Run BPE with the merges so far and add one merge at a time until the word is a
        # single token. A naive chain per word breaks as soon as words share letter pairs
        # ("right" adds r+i early, so "triangle" would stop at t/ri/...). New merges rank
        # last, so they never change how earlier words tokenize.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while True:
            pieces = _apply_merges(pieces, ranks)
            if len(pieces) == 1:
                break
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab_list.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({tok: i for i, tok in enumerate(vocab_list)}, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                            model_max_length=max_length, pad_token="<|endoftext|>")
    return tok
