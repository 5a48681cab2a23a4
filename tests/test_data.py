"""The embedded world's data: determinism, captions vs labels, eval prompts, image folders."""
import json
import os

import pytest
import torch

from diffusion_distill.world.data import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    ImageFolderDataset,
    ShapesWorld,
    canonical_pair,
    caption_for,
    eval_prompts,
    render_prompts,
)


def test_batches_are_deterministic_and_seeded():
    a = ShapesWorld(0).batch(16, 5)
    b = ShapesWorld(0).batch(16, 5)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    c = ShapesWorld(0).batch(16, 6)
    d = ShapesWorld(1).batch(16, 5)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # keyword spelling used by the training loop
    e = ShapesWorld(0).batch(16, seed=5)
    assert torch.equal(a[0], e[0])


def test_images_shape_and_range():
    images, captions, labels = ShapesWorld(3).batch(32, 0)
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert len(captions) == len(labels) == 32
    small, _, _ = ShapesWorld(3, resolution=16).batch(4, 0)
    assert small.shape == (4, 3, 16, 16)


def _said(labels):
    """The labels as the caption states them."""
    out = dict(labels)
    for k in ("size", "position"):
        if out.get(f"said_{k}") is False:
            out[k] = None
    return out


def test_captions_agree_with_labels_and_vocabulary():
    _, captions, labels = ShapesWorld(7).batch(200, 0)
    kinds = set()
    for caption, lab in zip(captions, labels):
        kinds.add(lab["kind"])
        assert caption_for(_said(lab)) == caption
        assert set(caption.split()) <= set(WORDS), caption
        if lab["kind"] == "single":
            # the labels always describe the image completely, said or not
            assert lab["shape"] in SHAPES and lab["color"] in COLORS
            assert lab["size"] in SIZES and lab["position"] in POSITIONS
            assert lab["shape"] in caption and lab["color"] in caption
        if lab["kind"] == "pair":
            assert (lab["shape"], lab["color"]) != (lab["shape2"], lab["color2"])
            assert lab["relation"] in caption
    assert kinds == {"single", "pair", "count"}


def test_canonical_pair_maps_equivalent_prompts_together():
    a = {"kind": "pair", "shape": "circle", "color": "red", "relation": "left of",
         "shape2": "square", "color2": "blue"}
    b = {"kind": "pair", "shape": "square", "color": "blue", "relation": "right of",
         "shape2": "circle", "color2": "red"}
    assert canonical_pair(a) == canonical_pair(b)
    assert canonical_pair(a)["axis"] == "horizontal"
    assert canonical_pair(dict(a, relation="below"))["shape_a"] == "square"


def test_pair_scene_geometry_matches_relation():
    # The left/top object really is left/top: mean x (or y) of its colour's pixels.
    for relation, dim in (("left of", 0), ("above", 1)):  # profile over y gives x, and back
        lab = {"kind": "pair", "shape": "square", "color": "red", "relation": relation,
               "shape2": "square", "color2": "blue", "count": 2}
        img = render_prompts([lab])[0]
        red = (img[0] > 0.5) & (img[2] < 0)
        blue = (img[2] > 0.5) & (img[0] < 0)
        def centre(mask, dim=dim):
            w = mask.float().sum(dim=dim)
            return (w * torch.arange(32.0)).sum() / w.sum()
        assert centre(red) < centre(blue)


def test_eval_prompts_fixed_complete_and_held_out():
    prompts, labels = eval_prompts("single", 120)
    assert len(set(prompts)) == 120  # every combination exactly once
    assert prompts == eval_prompts("single", 120)[0]
    assert all(caption_for(lab) == p for p, lab in zip(prompts, labels))
    pairs, pair_labels = eval_prompts("pair", 50)
    assert pairs == eval_prompts("pair", 50)[0]
    assert all(lab["kind"] == "pair" for lab in pair_labels)
    # drawn from seeds the training stream does not use
    _, train_caps, _ = ShapesWorld(0).batch(50, 0)
    assert train_caps != pairs
    with pytest.raises(ValueError, match="kind"):
        eval_prompts("triple", 3)


# -- image folders -------------------------------------------------------------------------
def _write_png(path, color=(200, 30, 30), size=(40, 48)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_image_folder_with_txt_captions(tmp_path):
    _write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    _write_png(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "b.txt").write_text("a blue thing")
    ds = ImageFolderDataset(str(tmp_path), resolution=16)
    assert len(ds) == 2
    img, cap = ds[0]
    assert img.shape == (3, 16, 16) and cap == "a red thing"
    assert img.min() >= -1 and img.max() <= 1
    assert abs(img[0].mean().item() - (200 / 127.5 - 1)) < 0.02
    images, caps = ds.get_many([0, 1])
    assert images.shape == (2, 3, 16, 16) and caps == ["a red thing", "a blue thing"]


def test_image_folder_with_metadata_jsonl(tmp_path):
    _write_png(tmp_path / "x.png")
    with open(tmp_path / "metadata.jsonl", "w") as f:
        f.write(json.dumps({"file_name": "x.png", "text": "hello"}) + "\n")
    ds = ImageFolderDataset(str(tmp_path), resolution=8)
    assert ds[0][1] == "hello"


def test_image_folder_bad_files_skip_or_raise(tmp_path):
    _write_png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("broken")
    _write_png(tmp_path / "nocap.png")
    with pytest.warns(UserWarning, match="broken.png"):
        ds = ImageFolderDataset(str(tmp_path), on_error="skip")
    assert len(ds) == 1 and ds[0][1] == "fine"
    assert {name for name, _ in ds.skipped} == {"broken.png", "nocap.png"}
    with pytest.raises(ValueError, match=r"broken\.png.*on_error='skip'"):
        ImageFolderDataset(str(tmp_path), on_error="raise")
    os.remove(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="nocap.png: no caption"):
        ImageFolderDataset(str(tmp_path), on_error="raise")


def test_image_folder_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no usable image"):
        ImageFolderDataset(str(tmp_path))
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderDataset(str(tmp_path), on_error="ignore")
