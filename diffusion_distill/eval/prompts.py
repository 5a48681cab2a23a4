"""Prompt files for the standard protocol: COCO captions JSON, .txt, .jsonl, .csv and .tsv."""
from __future__ import annotations

import csv
import json
import os

PROMPT_FORMATS = ("a COCO captions .json ({'annotations': [{'image_id', 'caption'}, ...]}), a "
                  ".txt (one prompt per line), a .jsonl (objects with 'caption' or 'prompt') "
                  "or a .csv/.tsv with a 'caption' or 'prompt' column")


def load_prompts(path, n: int | None = None) -> list[str]:
    """The first ``n`` prompts (all when None) of a COCO-style prompt file.

    A COCO captions JSON gives one caption per image: the first listed for each ``image_id``,
    images in ascending id order, so the set is the same whatever order the file uses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; expected {PROMPT_FORMATS}")
    ext = os.path.splitext(path)[1].lower()
    readers = {".json": _coco_captions, ".txt": _text_lines, ".jsonl": _json_lines,
               ".csv": _table, ".tsv": _table}
    if ext not in readers:
        raise ValueError(f"prompt file {path!r} has an unknown format {ext or '(no suffix)'!r}; "
                         f"expected {PROMPT_FORMATS}")
    with open(path, encoding="utf-8", newline="") as f:
        prompts = [str(p).strip() for p in readers[ext](f, path)]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts; expected {PROMPT_FORMATS}")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of prompts must be a positive integer, got {n!r}")
        if n > len(prompts):
            raise ValueError(f"asked for {n} prompts but {path!r} holds only {len(prompts)}; "
                             "lower num_samples or give a larger prompt file")
        prompts = prompts[:n]
    return prompts


def _coco_captions(f, path):
    data = json.load(f)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        # A malformed file, not a wrong argument type: ValueError, as for the other formats.
        raise ValueError(  # noqa: TRY004
            f"{path!r} is not a COCO captions file: expected {{'annotations': "
            f"[{{'image_id': ..., 'caption': ...}}, ...]}}, got {got}")
    first = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path!r}: annotation {i} needs 'image_id' and 'caption', got "
                             f"{str(ann)[:100]}")
        first.setdefault(ann["image_id"], ann["caption"])
    return [first[k] for k in sorted(first, key=lambda k: (isinstance(k, str), k))]


def _text_lines(f, path):
    return [line for line in f if line.strip()]


def _field(row, where):
    for key in ("caption", "prompt"):
        if isinstance(row, dict) and row.get(key) is not None:
            return row[key]
    raise ValueError(f"{where} has no 'caption' or 'prompt' field: {str(row)[:100]}")


def _json_lines(f, path):
    return [_field(json.loads(line), f"{path!r} line {i}")
            for i, line in enumerate(f, 1) if line.strip()]


def _table(f, path):
    reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
    if not {"caption", "prompt"} & set(reader.fieldnames or []):
        raise ValueError(f"{path!r} has no 'caption' or 'prompt' column; its header is "
                         f"{reader.fieldnames}")
    return [_field(row, f"{path!r} row {i}") for i, row in enumerate(reader, 1)]
