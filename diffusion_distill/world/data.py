"""The embedded world's data: procedural 32x32 shape scenes with compositional captions.

Every sample is drawn from a seed, so the world is unlimited and exactly reproducible. Three
kinds of scene share one renderer:

* ``single``: one shape with colour, size and position ("a large red circle on the left");
* ``pair``:   two small shapes and a relation ("a red circle left of a blue square");
* ``count``:  two or three identical small shapes ("two green triangles").

Each sample also carries its attribute labels (a dict), which is what the attribute classifier
(``world.classifier``) is trained on and what prompt alignment is scored against.

The held-out evaluation prompts (:func:`eval_prompts`) are drawn from fixed seeds that the
training stream never uses (training seeds are folded with the world seed into a separate
range; see ``_EVAL_SEED``).

Also here: :class:`ImageFolderDataset`, a user's folder of captioned images.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch
import torch.nn.functional as F

from ..imaging import to_uint8

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB in [0, 1]; saturated and far apart so colour is never ambiguous
    "red": (0.92, 0.15, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.15),
}
SIZES = {"small": (4.5, 5.5), "large": (8.5, 10.0)}  # radius range in pixels
# Single-object positions: centre (x, y) in pixels, jittered by +-2 px.
POSITIONS = {"left": (9.0, 16.0), "right": (23.0, 16.0), "top": (16.0, 9.0),
             "bottom": (16.0, 23.0), "center": (16.0, 16.0)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
KINDS = ("single", "pair", "count")
# How often each kind appears in the training stream: single-object scenes matter most.
KIND_PROBS = (0.5, 0.35, 0.15)

_SUPERSAMPLE = 4  # render at 4x and average: anti-aliased edges, so the VAE sees clean shapes
_EVAL_SEED = {"single": 7_000_001, "pair": 7_000_002, "count": 7_000_003}
_TRAIN_SEED_BASE = 1_000_003  # training generators are seeded far from the eval seeds


def _vocabulary() -> list[str]:
    words = ["a", "an", "the", "of", "on", "at", "in", "left", "right", "top", "bottom",
             "center", "above", "below", "one", "two", "three", "small", "large"]
    words += list(SHAPES) + [s + "s" for s in SHAPES] + list(COLORS)
    return list(dict.fromkeys(words))


WORDS = _vocabulary()
"""Every word a caption of this world can contain (the tokenizer's vocabulary)."""


# -- captions --------------------------------------------------------------------------------
def caption_for(labels: dict) -> str:
    """The caption of a labels dict; attributes absent from ``labels`` are left unsaid."""
    kind = labels["kind"]
    if kind == "single":
        words = ["a"]
        if labels.get("size"):
            words.append(labels["size"])
        words += [labels["color"], labels["shape"]]
        if labels.get("position"):
            words.append(POSITION_PHRASE[labels["position"]])
        return " ".join(words)
    if kind == "pair":
        return (f"a {labels['color']} {labels['shape']} {labels['relation']} "
                f"a {labels['color2']} {labels['shape2']}")
    if kind == "count":
        n = labels["count"]
        noun = labels["shape"] + ("s" if n > 1 else "")
        return f"{COUNT_WORDS[n]} {labels['color']} {noun}"
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def canonical_pair(labels: dict) -> dict:
    """A pair prompt in image terms: the axis and the first (left/top) and second object.

    "A left of B" and "B right of A" describe the same picture, so the classifier predicts
    this canonical form and prompts are mapped onto it before comparing.
    """
    a = (labels["shape"], labels["color"])
    b = (labels["shape2"], labels["color2"])
    rel = labels["relation"]
    if rel not in RELATIONS:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    axis = "horizontal" if rel in ("left of", "right of") else "vertical"
    first, second = (a, b) if rel in ("left of", "above") else (b, a)
    return {"axis": axis, "shape_a": first[0], "color_a": first[1],
            "shape_b": second[0], "color_b": second[1]}


# -- rendering -------------------------------------------------------------------------------
def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of one shape on a ``size`` x ``size`` canvas."""
    n = size * _SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        h = r * 0.85  # same visual area as the circle, roughly
        inside = (dx.abs() <= h) & (dy.abs() <= h)
    elif shape == "triangle":
        # Upward equilateral-ish triangle inscribed in the radius-r circle, nudged down so
        # its visual centre sits on (cx, cy).
        top, base = -r, r * 0.75
        t = (dy - top) / (base - top)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (dx.abs() <= t * r * 1.05)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return F.avg_pool2d(inside.float()[None, None], _SUPERSAMPLE)[0, 0]


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _choice(g: torch.Generator, options):
    options = list(options)
    return options[int(torch.randint(len(options), (), generator=g))]


def _objects_for(labels: dict, g: torch.Generator) -> list[tuple[str, str, float, float, float]]:
    """(shape, colour, cx, cy, r) of every object a labels dict describes, with jitter."""
    kind = labels["kind"]
    small = SIZES["small"]
    if kind == "single":
        size = labels.get("size") or _choice(g, SIZES)
        pos = labels.get("position") or _choice(g, POSITIONS)
        r = _u(g, *SIZES[size])
        px, py = POSITIONS[pos]
        # Large shapes near an edge would be clipped: keep every shape inside the canvas.
        cx = min(max(px + _u(g, -2, 2), r + 1), RESOLUTION - r - 1)
        cy = min(max(py + _u(g, -2, 2), r + 1), RESOLUTION - r - 1)
        return [(labels["shape"], labels["color"], cx, cy, r)]
    if kind == "pair":
        c = canonical_pair(labels)
        r1, r2 = _u(g, *small), _u(g, *small)
        # First object in the left/top half, second in the right/bottom half; the other
        # coordinate wanders a little so the relation, not a fixed layout, is what is learnt.
        along1, along2 = _u(g, 7.5, 11.5), _u(g, 20.5, 24.5)
        across1, across2 = _u(g, 11, 21), _u(g, 11, 21)
        if c["axis"] == "horizontal":
            p1, p2 = (along1, across1), (along2, across2)
        else:
            p1, p2 = (across1, along1), (across2, along2)
        return [(c["shape_a"], c["color_a"], *p1, r1), (c["shape_b"], c["color_b"], *p2, r2)]
    if kind == "count":
        n = labels["count"]
        # Non-overlapping spots: jittered cells of a 3x3 grid, n of them chosen at random.
        cells = torch.randperm(9, generator=g)[:n].tolist()
        objs = []
        for cell in cells:
            gx, gy = cell % 3, cell // 3
            r = _u(g, 3.8, 4.6)
            objs.append((labels["shape"], labels["color"], 6 + 10 * gx + _u(g, -1, 1),
                         6 + 10 * gy + _u(g, -1, 1), r))
        return objs
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def render(labels: dict, g: torch.Generator) -> torch.Tensor:
    """One image in [-1, 1], (3, 32, 32), of the scene ``labels`` describes."""
    # A dark, slightly varying grey background: enough variety that the models cannot
    # memorise pixels, never bright enough to be confused with a shape's colour.
    bg = _u(g, 0.05, 0.2)
    img = torch.full((3, RESOLUTION, RESOLUTION), bg)
    for shape, color, cx, cy, r in _objects_for(labels, g):
        rgb = torch.tensor(COLORS[color]) + torch.empty(3).uniform_(-0.05, 0.05, generator=g)
        mask = _shape_mask(shape, cx, cy, r, RESOLUTION)
        img = img * (1 - mask) + rgb.clamp(0, 1)[:, None, None] * mask
    return img * 2 - 1


# -- sampling labels -------------------------------------------------------------------------
def sample_labels(g: torch.Generator, kind: str | None = None, full: bool = False) -> dict:
    """Random scene labels. ``full`` mentions every attribute (eval prompts do).

    Training captions leave out size or position one time in five, so the teacher also learns
    what an underspecified prompt means. Such attributes are ``None`` here; the batch fills
    them with what the renderer drew and marks them ``said_size=False`` /
    ``said_position=False``, so alignment scoring can ignore what the caption did not ask for.
    """
    if kind is None:
        kind = KINDS[int(torch.multinomial(torch.tensor(KIND_PROBS), 1, generator=g))]
    if kind == "single":
        labels = {"kind": "single", "shape": _choice(g, SHAPES), "color": _choice(g, COLORS),
                  "size": _choice(g, SIZES), "position": _choice(g, POSITIONS), "count": 1}
        if not full:
            if _u(g) < 0.2:
                labels["size"] = None
            if _u(g) < 0.2:
                labels["position"] = None
        return labels
    if kind == "pair":
        a = (_choice(g, SHAPES), _choice(g, COLORS))
        b = a
        while b == a:  # two identical objects would make the relation meaningless
            b = (_choice(g, SHAPES), _choice(g, COLORS))
        return {"kind": "pair", "shape": a[0], "color": a[1], "relation": _choice(g, RELATIONS),
                "shape2": b[0], "color2": b[1], "count": 2}
    if kind == "count":
        return {"kind": "count", "shape": _choice(g, SHAPES), "color": _choice(g, COLORS),
                "count": _choice(g, (2, 3))}
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def _filled(labels: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Render, and complete the labels with the attributes the renderer chose."""
    labels = dict(labels)
    if labels["kind"] == "single":
        # Draw unsaid attributes here so the returned labels describe the image exactly.
        if not labels.get("size"):
            labels["size"] = _choice(g, SIZES)
            labels["said_size"] = False
        if not labels.get("position"):
            labels["position"] = _choice(g, POSITIONS)
            labels["said_position"] = False
    return labels, render(labels, g)


class ShapesWorld:
    """An unlimited, seeded stream of (image, caption, labels).

    >>> images, captions, labels = ShapesWorld(0).batch(8, 123)
    >>> images.shape
    torch.Size([8, 3, 32, 32])

    Args:
        seed: the world's seed; two worlds with the same seed give the same batches.
        kinds: which scene kinds to draw (default all three, see ``KIND_PROBS``).
        resolution: output side; scenes are drawn at 32 px and resized (area/bilinear), so the
            content is the same at every resolution.
    """

    words = WORDS

    def __init__(self, seed: int = 0, kinds: tuple[str, ...] | None = None,
                 resolution: int = RESOLUTION):
        self.seed = int(seed)
        if int(resolution) < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
        self.resolution = int(resolution)
        if kinds is not None:
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise ValueError(f"unknown scene kinds {bad}; expected a subset of {KINDS}")
        self.kinds = tuple(kinds) if kinds else None

    def generator(self, index: int) -> torch.Generator:
        """The generator of batch ``index`` of this world (never one of the eval seeds)."""
        return torch.Generator().manual_seed(_TRAIN_SEED_BASE + self.seed * 1_000_003 + index)

    def _kind(self, g):
        if self.kinds is None:
            return None
        return self.kinds[int(torch.randint(len(self.kinds), (), generator=g))]

    def batch(self, n: int, generator_or_seed: torch.Generator | int | None = None,
              seed: int | None = None):
        """``n`` samples: images (n, 3, R, R) in [-1, 1], captions, labels dicts.

        ``generator_or_seed`` (or ``seed=``) picks the batch: the same value always gives the
        same batch of this world.
        """
        if generator_or_seed is None:
            generator_or_seed = 0 if seed is None else seed
        g = (generator_or_seed if isinstance(generator_or_seed, torch.Generator)
             else self.generator(int(generator_or_seed)))
        images, captions, labels = [], [], []
        for _ in range(n):
            lab = sample_labels(g, self._kind(g))
            captions.append(caption_for(lab))
            lab, img = _filled(lab, g)
            labels.append(lab)
            images.append(img)
        images = torch.stack(images)
        if self.resolution != RESOLUTION:
            mode = "area" if self.resolution < RESOLUTION else "bilinear"
            images = F.interpolate(images, size=(self.resolution,) * 2, mode=mode).clamp(-1, 1)
        return images, captions, labels

    def captions(self, n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
        """``n`` captions and labels without rendering: all a prompts-only objective needs."""
        g = self.generator(int(seed))
        labels = [sample_labels(g, self._kind(g)) for _ in range(n)]
        return [caption_for(lab) for lab in labels], labels

    def __iter__(self):
        raise TypeError("ShapesWorld is unlimited; use world.stream(batch_size) or world.batch(n, i)")

    def stream(self, batch_size: int, start: int = 0):
        """Batches ``start, start+1, ...`` forever; resuming at ``start`` repeats nothing."""
        i = start
        while True:
            yield self.batch(batch_size, i)
            i += 1


def render_prompts(labels: list[dict], seed: int = 0) -> torch.Tensor:
    """Real images of given prompts' labels (reference sets for the eval metrics)."""
    g = torch.Generator().manual_seed(_TRAIN_SEED_BASE - 1 - seed)
    return torch.stack([_filled(lab, g)[1] for lab in labels])


def eval_prompts(kind: str = "single", n: int = 64) -> tuple[list[str], list[dict]]:
    """The fixed held-out evaluation prompts: ``(prompts, labels)``.

    ``single`` prompts name every attribute (shape, colour, size, position); the list walks
    through all 120 combinations in a fixed shuffled order before repeating. ``pair`` prompts
    are two objects and a relation; ``count`` prompts two or three identical objects. Always
    the same for the same ``(kind, n)``, and drawn from seeds the training stream never uses.
    """
    if kind not in KINDS:
        raise ValueError(f"eval prompt kind must be one of {KINDS}, got {kind!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(_EVAL_SEED[kind])
    if kind == "single":
        combos = [{"kind": "single", "shape": s, "color": c, "size": z, "position": p,
                   "count": 1}
                  for s in SHAPES for c in COLORS for z in SIZES for p in POSITIONS]
        order = torch.randperm(len(combos), generator=g).tolist()
        labels = [dict(combos[order[i % len(combos)]]) for i in range(n)]
    else:
        labels = [sample_labels(g, kind, full=True) for _ in range(n)]
    return [caption_for(lab) for lab in labels], labels


# -- a user's folder of images ---------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of images with captions: ``name.png`` + ``name.txt``, or a ``metadata.jsonl``.

    ``metadata.jsonl`` holds one ``{"file_name": ..., "text": ...}`` object per line (the
    layout diffusers' and datasets' image folders use); without it, each image's caption is
    the same-named ``.txt`` file. Images are converted to RGB, resized (shorter side, then a
    centre crop) to ``resolution`` and returned in [-1, 1], (3, resolution, resolution).

    Args:
        path: the folder.
        resolution: output side in pixels.
        on_error: ``"skip"`` reports a bad file (unreadable image, missing or empty caption)
            with a warning and leaves it out; ``"raise"`` refuses it with a ValueError.

    Every file is checked once, when the dataset is built, so a bad file is found before a long
    training run starts rather than in the middle of it.
    """

    def __init__(self, path: str, resolution: int = 32, on_error: str = "skip"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"image folder {path!r} does not exist or is not a folder. Expected a folder of "
                "images with same-named .txt captions, or with a metadata.jsonl."
            )
        self.path, self.resolution, self.on_error = path, int(resolution), on_error
        self.skipped: list[tuple[str, str]] = []  # (file name, why), for the caller to inspect
        captions = self._read_captions()
        self.items: list[tuple[str, str]] = []
        for name, caption in captions:
            problem = self._check(name, caption)
            if problem:
                self._bad(name, problem)
            else:
                self.items.append((name, caption))
        if not self.items:
            raise ValueError(
                f"image folder {path!r} holds no usable image with a caption "
                f"({len(self.skipped)} skipped). Put images ({', '.join(IMAGE_EXTENSIONS)}) "
                "there with a same-named .txt caption each, or a metadata.jsonl."
            )

    def _read_captions(self) -> list[tuple[str, str | None]]:
        meta = os.path.join(self.path, "metadata.jsonl")
        if os.path.isfile(meta):
            out = []
            with open(meta) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        out.append((str(row["file_name"]), row.get("text")))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self._bad(f"metadata.jsonl line {lineno}",
                                  'not a JSON object with "file_name" (and "text")')
            return out
        names = sorted(f for f in os.listdir(self.path)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        out = []
        for name in names:
            txt = os.path.join(self.path, os.path.splitext(name)[0] + ".txt")
            caption = None
            if os.path.isfile(txt):
                with open(txt) as f:
                    caption = f.read().strip()
            out.append((name, caption))
        return out

    def _check(self, name: str, caption: str | None) -> str | None:
        from PIL import Image

        if not caption or not str(caption).strip():
            return ("no caption (expected a same-named .txt file, or a \"text\" field in "
                    "metadata.jsonl)")
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            return "listed in metadata.jsonl but the file does not exist"
        try:
            with Image.open(file) as im:
                im.verify()  # reads the whole file: catches truncated/corrupt images
        except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad files
            return f"unreadable image ({type(e).__name__}: {e})"
        return None

    def _bad(self, name: str, problem: str):
        if self.on_error == "raise":
            raise ValueError(
                f"bad file in image folder {self.path!r}: {name}: {problem}. Fix or remove the "
                "file, or build the dataset with on_error='skip' to leave such files out."
            )
        self.skipped.append((name, problem))
        warnings.warn(f"skipping {name} in {self.path}: {problem}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        name, caption = self.items[i]
        with Image.open(os.path.join(self.path, name)) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.resolution / min(w, h)
            im = im.resize((max(self.resolution, round(w * scale)),
                            max(self.resolution, round(h * scale))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
            im = im.crop((left, top, left + self.resolution, top + self.resolution))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        img = data.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float()
        return img / 127.5 - 1, caption

    def get_many(self, indices) -> tuple[torch.Tensor, list[str]]:
        """Images (len(indices), 3, R, R) and their captions."""
        pairs = [self[i] for i in indices]
        return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]

    batch = get_many


def to_uint8_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Images in [-1, 1] -> one (H, W, 3) uint8 grid, for saving a PNG to look at."""
    images = to_uint8(images)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros((c, rows * (h + 2), nrow * (w + 2)), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, k * (w + 2) + 1: k * (w + 2) + 1 + w] = images[i]
    return grid.permute(1, 2, 0).contiguous()


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 4):
    from PIL import Image

    from ..checkpoint import atomic_path
    from ..imaging import image_format

    fmt = image_format(path)
    grid = to_uint8_grid(images, nrow)
    im = Image.fromarray(grid.numpy())
    with atomic_path(path) as tmp:  # a full disk mid-save keeps the previous image
        im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(tmp, format=fmt)
