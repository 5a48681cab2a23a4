"""Features and evaluate(), kept small: small feature sizes, 4-24 images."""
import pytest
import torch

from diffusion_distill.eval.evaluate import cached_features, evaluate
from diffusion_distill.eval.features import (
    FeatureExtractor,
    get_feature_extractor,
    load_efficientnet_lite0,
    weights_path,
)
from diffusion_distill.world.data import render_prompts

SIZE = 64  # small enough to be fast, large enough for the 32x-downsampling network


@pytest.fixture(scope="module")
def extractor():
    return get_feature_extractor(SIZE)


def shapes(shape, n, seed=0):
    labels = [{"kind": "single", "shape": shape, "color": "green", "size": "large",
               "position": "center", "count": 1}] * n
    return render_prompts(labels, seed=seed)


def test_weights_load_strictly_and_match_the_file():
    model = load_efficientnet_lite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    ours = model.state_dict()
    wanted = {k for k in state if not k.endswith("num_batches_tracked")}
    assert wanted == {k for k in ours if not k.endswith("num_batches_tracked")}
    for k in ("_conv_stem.weight", "_blocks.15._project_conv.weight", "_fc.bias"):
        assert torch.equal(ours[k], state[k])


def test_features_shape_name_and_determinism(extractor):
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    f1, f2 = extractor.extract(x), extractor.extract(x)
    assert f1.shape == (5, 1280) and f1.dtype == torch.float32
    assert torch.equal(f1, f2)
    # a sample's features do not depend on what else is in its batch (eval-mode BN)
    assert torch.allclose(extractor.extract(x[:2]), f1[:2], atol=1e-4)
    assert extractor.name == f"efficientnet-lite0-imagenet@{SIZE}px"
    gray = extractor.extract(x[:2, :1])
    assert gray.shape == (2, 1280)
    with pytest.raises(ValueError, match="at least 32"):
        FeatureExtractor(size=16)


def test_pretrained_features_separate_procedural_classes(extractor):
    """Circles vs triangles, same colour/size/place: nearest class mean, leave one out."""
    feats = torch.cat([extractor.extract(shapes("circle", 12, 1)),
                       extractor.extract(shapes("triangle", 12, 2))])
    y = torch.tensor([0] * 12 + [1] * 12)
    right = 0
    for i in range(len(feats)):
        keep = torch.arange(len(feats)) != i
        means = torch.stack([feats[keep & (y == c)].mean(0) for c in (0, 1)])
        right += int(torch.cdist(feats[i:i + 1], means).argmin()) == int(y[i])
    assert right / len(feats) >= 0.9


def test_imagenet_predictions_on_photos():
    """Only where scikit-image (and its bundled photos) is installed."""
    import numpy as np

    data = pytest.importorskip("skimage.data")
    fx = FeatureExtractor(size=224)

    def top5(img):
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        return set(fx.logits(x[None])[0].topk(5).indices.tolist())

    assert top5(data.chelsea()) & {281, 282, 283, 284, 285}  # cats
    assert top5(data.coffee()) & {967, 968, 504}  # espresso, cup, coffee mug


def test_evaluate_real_samples_match_reference_and_failures_are_reported(extractor):
    from diffusion_distill.world.data import eval_prompts

    prompts, labels = eval_prompts("single", 12)
    seeds = list(range(12))
    real = render_prompts(labels, seed=0)
    by_prompt = dict(zip(prompts, real))

    def perfect(ps, ss):  # "samples" that are the reference images themselves
        return torch.stack([by_prompt[p] for p in ps])

    def align(images, labs):
        return {"whole_prompt": 1.0, "per_attribute": {"shape": torch.tensor(1.0)}}

    out = evaluate(perfect, prompts, seeds, real, labels=labels, alignment_fn=align,
                   batch_size=4, extractor=extractor, nfe=2, progress=False)
    assert out["complete"] and out["num_samples"] == 12 and not out["failures"]
    assert out["fd"] == pytest.approx(0.0, abs=1e-3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["alignment"]["per_attribute"]["shape"] == 1.0  # tensors became floats
    assert out["nfe"] == 2 and out["feature_space"] == extractor.name

    bad = prompts[5]

    def flaky(ps, ss):
        if bad in ps:
            raise RuntimeError("out of memory (simulated)")
        return perfect(ps, ss)

    out = evaluate(flaky, prompts, seeds, real, batch_size=4, extractor=extractor,
                   progress=False)
    assert not out["complete"] and out["num_samples"] == 8 and out["num_requested"] == 12
    (failure,) = out["failures"]
    assert bad in failure["prompts"] and failure["seeds"] == [4, 5, 6, 7]
    assert "simulated" in failure["error"]
    assert out["fd"] is not None  # computed on what succeeded, and flagged incomplete

    with pytest.raises(ValueError, match="one seed per prompt"):
        evaluate(perfect, prompts, seeds[:3], real, extractor=extractor)


def test_reference_features_are_cached(tmp_path, extractor):
    calls = []

    def make():
        calls.append(1)
        return shapes("square", 4)

    a = cached_features({"what": "squares", "n": 4}, make, extractor, str(tmp_path))
    b = cached_features({"what": "squares", "n": 4}, make, extractor, str(tmp_path))
    assert len(calls) == 1 and torch.equal(a, b)
