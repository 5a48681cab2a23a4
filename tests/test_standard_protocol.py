"""The standard protocol (eval/standard.py) with stand-in networks built here.

The real weights (clean-fid's Inception TorchScript file, a CLIP checkpoint) cannot be
downloaded on these machines, so the stand-ins have their shapes: a small TorchScript module
with ``layers`` and ``forward(x, return_features)`` (16-d features, so nothing may assume 2048),
and a tiny CLIPModel + CLIPProcessor saved with save_pretrained, trained here for a few steps
so that it matches colour words to colours.
"""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffusion_distill.eval import standard as st

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


class StandIn(nn.Module):
    """Shaped like StyleGAN's inception-2015-12-05.pt: ``layers`` and forward(x, return_features)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 13, stride=13), nn.Tanh(),
                                    nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = False):
        f = self.layers((x - 128) / 128).reshape(x.shape[0], -1)
        return f if return_features else f.softmax(-1)


class StandInNoLayers(nn.Module):
    """Only forward(x, return_features): the wrapper's fallback path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 13, stride=13)

    def forward(self, x, return_features: bool = False):
        return self.conv((x - 128) / 128).mean((2, 3))


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "standin-inception.pt"
    torch.jit.save(torch.jit.script(StandIn().eval()), str(path))
    return str(path)


def colour_image(colour: str, seed: int, shift: float = 0.0, size: int = 24) -> torch.Tensor:
    """A noisy flat-colour image in [-1, 1]; ``shift`` brightens it (another distribution)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[colour]).view(3, 1, 1) * 0.7
    return (base + 0.3 * torch.randn(3, size, size, generator=g) + shift).clamp(-1, 1)


def sample_fn_for(shift=0.0):
    def sample_fn(prompts, seeds):
        return torch.stack([colour_image(p.split()[1], s, shift) for p, s in zip(prompts, seeds)])
    return sample_fn


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"a {c} square\n" for _ in range(10) for c in COLOURS))
    return str(path)  # 30 prompts


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A tiny CLIP trained for 60 steps to pair colour words with colours (under a second)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion_distill.tokenizer import make_clip_tokenizer

    tok = make_clip_tokenizer(["a", "square", *COLOURS])
    n = len(tok)
    cfg = CLIPConfig(
        text_config={"vocab_size": n, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": n - 2,
                     "eos_token_id": n - 1, "pad_token_id": n - 1},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    processor = CLIPProcessor(tokenizer=tok, image_processor=CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}))
    text = tok([f"a {c} square" for c in COLOURS], padding=True, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        u8 = st.to_uint8(torch.stack([colour_image(c, 1000 + 3 * step + i)
                                      for i, c in enumerate(COLOURS)]))
        pixels = processor(images=list(u8), return_tensors="pt")["pixel_values"]
        loss = model(**text, pixel_values=pixels, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def config(prompt_file, **kw):
    return st.StandardConfig(prompts=prompt_file, **kw)


# -- prompts -------------------------------------------------------------------------------
def test_prompt_files_of_each_format_parse(tmp_path):
    coco = {"images": [], "annotations": [
        {"image_id": 42, "id": 1, "caption": "A dog on a sofa. "},
        {"image_id": 7, "id": 2, "caption": "A cat in a hat."},
        {"image_id": 42, "id": 3, "caption": "second caption of 42"},
        {"image_id": 9, "id": 4, "caption": "A red bus."}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    # First caption per image, images in id order, whitespace stripped.
    assert st.load_prompts(tmp_path / "c.json") == ["A cat in a hat.", "A red bus.",
                                                     "A dog on a sofa."]
    assert st.load_prompts(tmp_path / "c.json", n=2) == ["A cat in a hat.", "A red bus."]
    (tmp_path / "p.txt").write_text("one\n\n  two  \nthree\n")
    assert st.load_prompts(tmp_path / "p.txt") == ["one", "two", "three"]
    (tmp_path / "p.jsonl").write_text('{"caption": "a"}\n\n{"prompt": "b", "seed": 3}\n')
    assert st.load_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    assert st.load_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog"]
    (tmp_path / "p.tsv").write_text("prompt\tother\na cat\tx\na dog\ty\n")
    assert st.load_prompts(tmp_path / "p.tsv", n=1) == ["a cat"]


def test_bad_prompt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*COCO captions"):
        st.load_prompts(tmp_path / "nowhere.json")
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(ValueError, match="unknown format '.yaml'"):
        st.load_prompts(tmp_path / "p.yaml")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        st.load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="asked for 3 prompts.*holds only 2"):
        st.load_prompts(tmp_path / "p.txt", n=3)
    (tmp_path / "e.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(ValueError, match="holds no prompts"):
        st.load_prompts(tmp_path / "e.json")
    (tmp_path / "l.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="not a COCO captions file.*got list"):
        st.load_prompts(tmp_path / "l.json")
    (tmp_path / "t.csv").write_text("id,text\n1,a\n")
    with pytest.raises(ValueError, match="no 'caption' or 'prompt' column.*'id', 'text'"):
        st.load_prompts(tmp_path / "t.csv")
    (tmp_path / "x.jsonl").write_text('{"caption": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="line 2 has no 'caption' or 'prompt'"):
        st.load_prompts(tmp_path / "x.jsonl")


# -- the spec section ----------------------------------------------------------------------
def test_config_from_spec_env_defaults_and_errors(tmp_path, monkeypatch, prompt_file,
                                                  inception_path, clip_path):
    monkeypatch.delenv(st.ENV_INCEPTION, raising=False)
    monkeypatch.delenv(st.ENV_CLIP, raising=False)
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['inceptoin'\].*'inception'"):
        st.StandardConfig.from_dict({"prompts": prompt_file, "inceptoin": inception_path})
    # FID requested, weights missing: the error names the key and the environment variable.
    with pytest.raises(ValueError, match=r"standard.inception is not set and \$DDISTILL_INCEPTION"):
        st.StandardConfig.from_dict({"prompts": prompt_file, "reference": str(stats)})
    with pytest.raises(ValueError, match=r"standard.clip is not set and \$DDISTILL_CLIP"):
        st.StandardConfig.from_dict({"prompts": prompt_file, "metrics": ["clip_score"]})
    # ... but only for metrics that are requested.
    only_clip = st.StandardConfig.from_dict({"prompts": prompt_file, "metrics": ["clip_score"],
                                             "clip": clip_path})
    assert only_clip.inception is None and only_clip.reference_kind is None
    # Paths from the environment; relative spec paths from the spec's folder.
    monkeypatch.setenv(st.ENV_INCEPTION, inception_path)
    monkeypatch.setenv(st.ENV_CLIP, clip_path)
    cfg = st.StandardConfig.from_dict({"prompts": prompt_file, "reference": "ref.npz",
                                       "num_samples": 6}, base_dir=str(tmp_path))
    assert (cfg.inception, cfg.clip, cfg.reference) == (inception_path, clip_path, str(stats))
    assert cfg.metrics == ("fid", "clip_score") and cfg.fid_backend == "torchmetrics"
    assert cfg.reference_kind.startswith("inception statistics")
    d = cfg.describe(seed=3)
    assert d["seed"] == 3 and d["num_samples"] == 6 and len(d["prompts_sha256"]) == 16
    assert d == cfg.describe(seed=3) and json.dumps(d)
    monkeypatch.setenv(st.ENV_CLIP, str(tmp_path / "no-clip"))
    with pytest.raises(FileNotFoundError, match=r"\$DDISTILL_CLIP = .*no-clip.*not a local Hugging"):
        st.StandardConfig.from_dict({"prompts": prompt_file, "reference": str(stats)})
    for bad, match in [({"fid_backend": "pytorch-fid"}, "fid_backend must be one of"),
                       ({"metrics": ["fid", "kid"]}, "subset of"),
                       ({"num_samples": 1, "metrics": ["fid"]}, "integer >= 2"),
                       ({"metrics": ["fid"]}, "standard.reference is not set"),
                       ({"reference": str(tmp_path / "nope")}, "reference = .*does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            st.StandardConfig.from_dict({"prompts": prompt_file, "clip": clip_path, **bad})


# -- the sample folder ---------------------------------------------------------------------
def test_sample_folder_round_trips_and_rewrites_safely(tmp_path):
    folder = tmp_path / "samples"
    images = torch.stack([colour_image(c, i) for i, c in enumerate(["red", "blue", "green"])])
    st.write_samples(images[:2], ["a red square", "a blue square"], [5, 6], str(folder))
    st.write_samples(images[2:], ["a green square"], [7], str(folder), start=2)
    st.write_samples(images[:2], ["a red square", "a blue square"], [5, 6], str(folder))  # again
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png", st.PROMPTS_FILE]
    assert len(st.image_files(str(folder))) == 3  # what clean-fid's folder reader would score
    u8 = st.to_uint8(images)
    for i in range(3):
        png = np.asarray(Image.open(folder / f"{i:06d}.png"))
        assert png.dtype == np.uint8 and png.shape == (24, 24, 3)
        assert np.array_equal(png, u8[i].permute(1, 2, 0).numpy())
    lines = [json.loads(x) for x in (folder / st.PROMPTS_FILE).read_text().splitlines()]
    assert lines == [{"index": i, "file": f"{i:06d}.png", "seed": 5 + i, "prompt": p}
                     for i, p in enumerate(["a red square", "a blue square", "a green square"])]
    with pytest.raises(ValueError, match="2 images, 1 prompts and 2 seeds"):
        st.write_samples(images[:2], ["x"], [1, 2], str(folder))
    # An evaluation clears its own earlier samples but refuses to mix with foreign images.
    (folder / "000000.png.123.tmp").write_bytes(b"half a png")
    st.prepare_sample_dir(str(folder))
    assert os.listdir(folder) == []
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(folder / "photo.jpg")
    with pytest.raises(ValueError, match="holds other images.*photo.jpg"):
        st.prepare_sample_dir(str(folder))


# -- Inception features and FID ------------------------------------------------------------
def test_clean_resize_is_float_pil_bicubic_without_requantizing():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    out = st.clean_resize(image)
    assert out.shape == (3, 299, 299) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, out.round())  # kept as floats: no second quantization
    # The same filter as PIL's 8-bit bicubic (which rounds and clips between its two passes),
    # far from bilinear.
    def pil(resample):
        return np.asarray(Image.fromarray(image).resize((299, 299), resample)).transpose(2, 0, 1)
    assert np.abs(out - pil(Image.BICUBIC)).mean() < 0.5
    assert np.abs(out - pil(Image.BILINEAR)).mean() > 5
    flat = np.full((17, 23, 3), 77, dtype=np.uint8)
    assert np.allclose(st.clean_resize(flat), 77)


@pytest.mark.parametrize("net", [StandIn, StandInNoLayers])
def test_inception_wrapper_feeds_the_network_like_clean_fid(net, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net().eval()), str(path))
    ext = st.InceptionFeatures(str(path))
    assert ext.num_features == (16 if net is StandIn else 8)  # read from the network
    u8 = st.to_uint8(torch.stack([colour_image("red", s, size=31) for s in range(3)]))
    feats = ext(u8)
    assert feats.dtype == torch.float64 and feats.shape == (3, ext.num_features)
    resized = torch.from_numpy(np.stack([st.clean_resize(im.permute(1, 2, 0).numpy())
                                         for im in u8]))
    with torch.no_grad():
        direct = torch.jit.load(str(path))(resized, return_features=True)
    assert torch.allclose(feats, direct.double(), atol=1e-6)
    with pytest.raises(ValueError, match="uint8 images.*got torch.float32"):
        ext(u8.float())
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        st.InceptionFeatures(str(tmp_path / "junk.pt"))


def test_precomputed_stats_in_torchmetrics_equal_its_own_features(inception_path):
    """Filling torchmetrics' real-feature sums from (mu, sigma) gives the FID it computes
    from the features themselves, with or without the true count."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = st.InceptionFeatures(inception_path)
    real = st.to_uint8(torch.stack([colour_image("red", s) for s in range(20)]))
    fake = st.to_uint8(torch.stack([colour_image("red", 100 + s, shift=0.2) for s in range(20)]))
    reference = FrechetInceptionDistance(feature=ext)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    expected = float(reference.compute())
    mu, sigma = st.moments(ext(real))
    for count in (20, None):
        metric = FrechetInceptionDistance(feature=ext)
        st.set_reference_stats(metric, mu, sigma, count)
        metric.update(fake, real=False)
        assert float(metric.compute()) == pytest.approx(expected, rel=1e-9)
    assert expected > 1e-3


def test_fid_near_zero_on_itself_larger_when_shifted_and_npz_equals_folder(
        tmp_path, prompt_file, inception_path):
    # The reference set: the same sampler and seeds, so the samples equal it image for image.
    ref_dir = tmp_path / "reference"
    prompts, seeds = st.load_prompts(prompt_file, 24), list(range(24))
    st.write_samples(sample_fn_for()(prompts, seeds), prompts, seeds, str(ref_dir))
    cfg = config(prompt_file, num_samples=24, inception=inception_path, reference=str(ref_dir),
                 metrics=["fid"])
    same = st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "s0"), progress=False,
                                batch_size=5, nfe=1)
    shifted = st.evaluate_standard(sample_fn_for(0.3), cfg, str(tmp_path / "s1"),
                                   progress=False, batch_size=5)
    other_seeds = st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "s2"), seed=500,
                                       progress=False)
    assert same["fid"] < 1e-6 * shifted["fid"]
    assert 0 < other_seeds["fid"] < shifted["fid"]  # same distribution, other draws
    assert same["feature_space"] == "inception-v3-16@299 clean resize (torchmetrics)"
    assert same["reference"] == {"path": str(ref_dir), "kind": "image folder", "num_images": 24}
    assert same["num_samples"] == 24 and same["nfe"] == 1 and same["clip_score"] is None
    assert same["seconds_per_image"] > 0 and json.dumps(same)
    # Statistics written once from the folder give the same FID as the folder itself.
    info = st.write_reference_stats(str(ref_dir), inception_path, str(tmp_path / "ref.npz"),
                                    progress=False)
    assert info == {"path": str(tmp_path / "ref.npz"), "num_images": 24, "feature_dim": 16}
    npz_cfg = config(prompt_file, num_samples=24, inception=inception_path,
                     reference=str(tmp_path / "ref.npz"), metrics=["fid"])
    from_npz = st.evaluate_standard(sample_fn_for(0.3), npz_cfg, str(tmp_path / "s3"),
                                    progress=False)
    # Equal up to the float32 network's rounding (the folder was read in batches of 5 there).
    assert from_npz["fid"] == pytest.approx(shifted["fid"], rel=1e-6)
    assert from_npz["reference"]["kind"] == "inception statistics (.npz, mu/sigma)"
    with pytest.raises(ValueError, match="overlap"):
        st.evaluate_standard(None, cfg, str(ref_dir), progress=False)
    # Statistics from another feature network are refused before any sampling.
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    wide = config(prompt_file, num_samples=4, inception=inception_path,
                  reference=str(tmp_path / "wide.npz"), metrics=["fid"])
    with pytest.raises(ValueError, match="2048-d statistics but the Inception gives 16-d"):
        st.evaluate_standard(None, wide, str(tmp_path / "s4"), progress=False)
    np.savez(tmp_path / "keys.npz", mean=np.zeros(16))
    with pytest.raises(ValueError, match=r"keys \['mean'\]; expected 'mu' and 'sigma'"):
        st.load_reference_stats(str(tmp_path / "keys.npz"))


# -- CLIP score ----------------------------------------------------------------------------
def test_clip_score_matched_beats_mismatched_and_is_torchmetrics_math(
        tmp_path, prompt_file, clip_path):
    from transformers import CLIPModel, CLIPProcessor

    cfg = config(prompt_file, num_samples=12, clip=clip_path, metrics=["clip_score"])
    matched = st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "m"), progress=False)

    def swapped(prompts, seeds):  # each image in the next colour: prompts no longer match
        order = list(COLOURS)
        return sample_fn_for()([f"a {order[(order.index(p.split()[1]) + 1) % 3]} square"
                                for p in prompts], seeds)

    mismatched = st.evaluate_standard(swapped, cfg, str(tmp_path / "x"), progress=False)
    assert matched["clip_score"] > mismatched["clip_score"] + 20
    assert matched["fid"] is None and matched["clip_model"] == clip_path
    # Recomputed independently from the saved PNGs through CLIPModel.forward's embeddings.
    model = CLIPModel.from_pretrained(clip_path).eval()
    processor = CLIPProcessor.from_pretrained(clip_path)
    folder = tmp_path / "m"
    lines = [json.loads(x) for x in (folder / st.PROMPTS_FILE).read_text().splitlines()]
    images = [torch.from_numpy(np.array(Image.open(folder / e["file"]))).permute(2, 0, 1)
              for e in lines]
    inputs = processor(text=[e["prompt"] for e in lines], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        out = model(**inputs)
    expected = max(100 * float((out.image_embeds * out.text_embeds).sum(-1).mean()), 0.0)
    assert matched["clip_score"] == pytest.approx(expected, rel=1e-4)


# -- clean-fid -----------------------------------------------------------------------------
def fake_cleanfid(monkeypatch, calls):
    """A stand-in ``cleanfid`` package that records how it is called."""
    fid = types.ModuleType("cleanfid.fid")
    script = types.ModuleType("cleanfid.inception_torchscript")

    class InceptionV3W:
        def __init__(self, path, download=True, resize_inside=False):
            calls["model"] = {"path": path, "download": download, "resize_inside": resize_inside,
                              "file_found": os.path.isfile(os.path.join(path, st.INCEPTION_FILE))}

        def to(self, device):
            return self

        def eval(self):
            return self

    def compute_fid(fdir1=None, fdir2=None, **kw):
        calls["compute_fid"] = {"fdir1": fdir1, "fdir2": fdir2, **kw}
        return 12.5

    def get_folder_features(fdir, model=None, **kw):
        calls["get_folder_features"] = {"fdir": fdir, "model": model, **kw}
        return np.random.default_rng(0).normal(size=(len(st.image_files(fdir)), 16))

    def frechet_distance(mu1, sigma1, mu2, sigma2):
        calls["frechet_distance"] = (mu1, sigma1, mu2, sigma2)
        return 3.25

    script.InceptionV3W = InceptionV3W
    fid.compute_fid, fid.get_folder_features = compute_fid, get_folder_features
    fid.frechet_distance = frechet_distance
    package = types.ModuleType("cleanfid")
    package.fid, package.inception_torchscript = fid, script
    for name, module in [("cleanfid", package), ("cleanfid.fid", fid),
                         ("cleanfid.inception_torchscript", script)]:
        monkeypatch.setitem(sys.modules, name, module)


def test_cleanfid_backend_calls_clean_fid_in_clean_mode(tmp_path, monkeypatch, prompt_file,
                                                        inception_path):
    calls = {}
    fake_cleanfid(monkeypatch, calls)
    ref_dir = tmp_path / "ref"
    st.write_samples(torch.stack([colour_image("red", s) for s in range(4)]), ["a"] * 4,
                     list(range(4)), str(ref_dir))
    cfg = config(prompt_file, num_samples=6, inception=inception_path, reference=str(ref_dir),
                 fid_backend="cleanfid", metrics=["fid"])
    r = st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "s"), progress=False)
    assert r["fid"] == 12.5 and r["feature_space"].endswith("(clean-fid)")
    c = calls["compute_fid"]
    assert (c["fdir1"], c["fdir2"], c["mode"]) == (str(tmp_path / "s"), str(ref_dir), "clean")
    assert isinstance(c["custom_feat_extractor"], sys.modules["cleanfid.inception_torchscript"]
                      .InceptionV3W)
    # clean-fid's own wrapper, on the local file (linked under the name it opens), no download.
    assert calls["model"]["file_found"] and calls["model"]["download"] is False
    assert calls["model"]["resize_inside"] is False
    assert len(st.image_files(c["fdir1"])) == 6  # the folder clean-fid reads holds the samples

    np.savez(tmp_path / "ref.npz", mu=np.full(16, 0.5), sigma=2 * np.eye(16))
    cfg.reference = str(tmp_path / "ref.npz")
    r = st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "s"), progress=False)
    assert r["fid"] == 3.25 and calls["get_folder_features"]["mode"] == "clean"
    mu1, sigma1, mu2, sigma2 = calls["frechet_distance"]
    assert mu1.shape == (16,) and sigma1.shape == (16, 16)
    assert np.allclose(mu2, 0.5) and np.allclose(sigma2, 2 * np.eye(16))


def test_cleanfid_missing_says_how_to_install(tmp_path, monkeypatch, prompt_file,
                                              inception_path):
    monkeypatch.setitem(sys.modules, "cleanfid", None)  # makes `import cleanfid` fail
    cfg = config(prompt_file, num_samples=4, inception=inception_path, reference=prompt_file,
                 fid_backend="cleanfid", metrics=["fid"])
    with pytest.raises(ImportError, match=r"pip install 'diffusion_distill\[cleanfid\]'"):
        st.evaluate_standard(sample_fn_for(), cfg, str(tmp_path / "s"), progress=False)
    assert not (tmp_path / "s").exists()  # failed before sampling


# -- through `ddistill bench` ----------------------------------------------------------------
def test_bench_spec_with_a_standard_section(tmp_path, tiny_sd_path, prompt_file, inception_path,
                                            clip_path, capsys, monkeypatch):
    """A bench spec's ``standard:`` section: the prompt file's prompts, PNG folders per cell,
    Inception FID against reference statistics and CLIP score in the tables; resumable."""
    import yaml

    from diffusion_distill.cli import main

    ref_dir = tmp_path / "reference"
    prompts, seeds = st.load_prompts(prompt_file, 12), list(range(12))
    st.write_samples(sample_fn_for()(prompts, seeds), prompts, seeds, str(ref_dir))
    monkeypatch.setenv(st.ENV_INCEPTION, inception_path)  # `ddistill stats` reads it
    assert main(["stats", str(ref_dir), "--out", str(tmp_path / "ref.npz")]) == 0
    assert "12 images, 16-d" in capsys.readouterr().out
    spec = {"name": "std", "teacher": tiny_sd_path, "teacher_steps": [2, 1], "batch_size": 3,
            "latency": False,
            "standard": {"prompts": prompt_file, "num_samples": 6, "inception": inception_path,
                         "clip": clip_path, "reference": str(tmp_path / "ref.npz")}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    argv = ["bench", str(tmp_path / "spec.yaml"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    cells = {c["cell"]: c for c in summary["cells"]}
    assert list(cells) == ["teacher-steps2-cfgdefault", "teacher-steps1-cfgdefault"]  # no world row
    one = cells["teacher-steps1-cfgdefault"]
    assert one["nfe"] == 2 and one["num_samples"] == 6  # 1 step x CFG, counted on the backbone
    assert one["fid"] > 0 and np.isfinite(one["clip_score"])
    assert one["feature_space"] == "inception-v3-16@299 clean resize (torchmetrics)"
    pngs = sorted(p.name for p in (out / "samples" / "teacher-steps1-cfg7.5").glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(6)]
    md = (out / "results.md").read_text()
    assert "| FID | CLIP score |" in md and "Standard protocol" in md
    assert (out / "metrics_vs_nfe.png").is_file()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 2


def test_every_shipped_spec_loads():
    from diffusion_distill.bench import load_spec

    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "specs")
    names = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert "coco_sd15_standard.yaml" in names
    for name in names:
        spec = load_spec(os.path.join(root, name))
        assert spec["name"] == name[:-5]


def test_a_failing_batch_is_recorded_and_skipped_as_in_every_evaluation(
        tmp_path, prompt_file, inception_path):
    """The standard protocol shares the world protocol's sampling loop and failure policy:
    the bad batch is listed, the others are scored, and the result says it is incomplete."""
    ref_dir = tmp_path / "reference"
    prompts, seeds = st.load_prompts(prompt_file, 20), list(range(20))
    st.write_samples(sample_fn_for()(prompts, seeds), prompts, seeds, str(ref_dir))
    cfg = config(prompt_file, num_samples=20, inception=inception_path, reference=str(ref_dir),
                 metrics=["fid"])
    good = sample_fn_for(0.2)

    def flaky(batch_prompts, batch_seeds):
        if 5 in batch_seeds:
            raise RuntimeError("out of memory (simulated)")
        return good(batch_prompts, batch_seeds)

    out = st.evaluate_standard(flaky, cfg, str(tmp_path / "s"), progress=False, batch_size=5)
    assert not out["complete"] and out["num_samples"] == 15 and out["num_requested"] == 20
    (failure,) = out["failures"]
    assert failure["seeds"] == [5, 6, 7, 8, 9] and "simulated" in failure["error"]
    written = [os.path.basename(p) for p in st.image_files(str(tmp_path / "s"))]
    assert written == [f"{i:06d}.png" for i in (*range(5), *range(10, 20))]
    # The FID is that of the 15 samples that were made: the same 15 images evaluated alone.
    kept = [i for i in range(20) if not 5 <= i < 10]
    subset = tmp_path / "kept.txt"
    subset.write_text("".join(prompts[i] + "\n" for i in kept))

    def the_kept_images(batch_prompts, batch_seeds):  # seed j of 15 -> the run's seed kept[j]
        return good(batch_prompts, [kept[j] for j in batch_seeds])

    alone = st.evaluate_standard(
        the_kept_images, config(str(subset), inception=inception_path, reference=str(ref_dir),
                                metrics=["fid"]),
        str(tmp_path / "alone"), progress=False, batch_size=5)
    assert alone["complete"] and alone["num_samples"] == 15
    assert out["fid"] > 0 and out["fid"] == pytest.approx(alone["fid"], rel=1e-6)
