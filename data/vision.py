"""Image data: an embedded synthetic set (no download, no file), a reader for image folders, and augmentation.

SyntheticImages(size, seed)  shapes of 8 classes with random colours, textures, size, position and rotation.
ImageFolder(root)            the torchvision layout root/<class>/<image files>, headers checked at start-up.
Both return (image uint8 (3, H, W), label int). `augment` turns one image into a float32 training crop.

pretraining_data, collate, collate_v2         train.py's images: BEiT augmentation and block masks (v2: MAE's, inverse
                                              block masks)
labelled_set, embedded, labelled_collate      finetune.py's: class folders, augmented or centre-cropped images
bench_data                                    bench.py's noise images
"""
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from config import patch_mask_size
from data import DataError, Repeat
from data.manifest import FileList, list_files, read_headers
from masking import block_mask, inverse_block_mask, visible_order

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


# ---------------------------------------------------------------------------------------------- synthetic images
def _star(u, v, r2):
    """5 tips: radius 0.4 between tips, 1 at a tip. cos 5θ from cos θ by Chebyshev (arctan2 is slow)."""
    c = u / np.sqrt(r2 + 1e-12)
    tip = 1 - np.arccos(np.clip(16 * c ** 5 - 20 * c ** 3 + 5 * c, -1, 1)) / np.pi      # triangle wave in θ
    return r2 <= (0.4 + 0.6 * tip ** 2) ** 2


_SHAPES = {     # the classes: inside-tests in the shape's own coordinates u, v (radius ~1), r2 = u² + v²
    'disk': lambda u, v, r2: r2 <= 1,
    'ring': lambda u, v, r2: (r2 <= 1) & (r2 >= 0.55 ** 2),
    'square': lambda u, v, r2: np.maximum(abs(u), abs(v)) <= 0.72,
    'triangle': lambda u, v, r2: (u <= 0.5) & (v * 0.866 - u * 0.5 <= 0.5) & (-v * 0.866 - u * 0.5 <= 0.5),
    'cross': lambda u, v, r2: ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | ((abs(v) <= 0.28) & (abs(u) <= 0.95)),
    'star': _star,
    'bar': lambda u, v, r2: (abs(u) <= 1) & (abs(v) <= 0.25),
    'crescent': lambda u, v, r2: (r2 <= 1) & ((u - 0.45) ** 2 + v * v >= 0.8 ** 2),
}


def _texture(rng, u, v):
    """Two-tone pattern in {0, 1} on coordinates u, v: solid, stripes, checker or dots."""
    kind, freq = rng.integers(4), rng.uniform(1.5, 3.5)
    if kind == 0:
        return np.zeros_like(u)
    if kind == 1:
        a = rng.uniform(0, np.pi)
        return np.sin((2 * np.pi * freq) * (u * math.cos(a) + v * math.sin(a))) > 0
    u, v = u * freq, v * freq
    if kind == 2:
        return (np.floor(u) + np.floor(v)) % 2
    return (u - np.floor(u) - 0.5) ** 2 + (v - np.floor(v) - 0.5) ** 2 < 0.09        # dots (floor: numpy's % is slow)


def _pool(a, k):
    """Average k×k blocks of (..., H, W) with strided sums: numpy's reduce over a reshape is ~10x slower, and
    torch's avg_pool2d was 10–100x slower whenever another process kept the CPU cores busy (thread contention)."""
    a = sum(a[..., j::k] for j in range(k))
    return sum(a[..., i::k, :] for i in range(k)) / (k * k)


def _value_noise(rng, S):
    """Smooth noise (S, S) in [0, 1]: a random grid of 3–8 nodes a side, interpolated with smoothstep weights."""
    def weights(g):                                   # (S, g): each pixel's weights on its two nearest grid nodes
        pos = np.linspace(0, g - 1, S, dtype=np.float32)
        i = np.minimum(pos.astype(int), g - 2)[:, None]
        f = pos[:, None] - i                                           # in [0, 1], 1 only at the last pixel
        f = f * f * (3 - 2 * f)
        return (np.arange(g) == i) * (1 - f) + (np.arange(g) == i + 1) * f
    gy, gx = rng.integers(3, 9, 2)
    return weights(gy) @ rng.random((gy, gx), dtype=np.float32) @ weights(gx).T


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic synthetic images: image i depends only on (seed, split, i); nothing is stored.

    The label is the shape (`classes`, i % 8, so balanced). Everything else is a nuisance a classifier must
    ignore: foreground and background colours, foreground texture, background texture (stripes of random
    frequency and orientation, a gradient or smooth noise), size, position and rotation. Rendered at 4x
    (2x above 64 px) and average-pooled, so edges are anti-aliased. Returns (uint8 (3, S, S), label).
    """

    def __init__(self, size=4096, seed=0, image_size=32, split='train'):
        if split not in ('train', 'valid'):
            raise ValueError(f"split must be 'train' or 'valid', not {split!r}")
        self.size, self.seed, self.image_size, self.split_id = size, seed, image_size, ('train', 'valid').index(split)
        self.classes = list(_SHAPES)
        self.ss = 4 if image_size <= 64 else 2                            # supersampling factor of the shape

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.split_id, i])
        label, S, k = i % len(_SHAPES), self.image_size, self.ss
        x = ((np.arange(S, dtype=np.float32) + 0.5) / S)[None, :]       # (1, S): pixel centres in [0, 1]
        # background mix t in [0, 1] (smooth, so rendered at S): stripes, gradient or value noise (coarse, upsampled)
        kind, a = rng.integers(3), rng.uniform(0, 2 * np.pi)
        ca, sa = math.cos(a), math.sin(a)                      # math, not np: a float64 scalar would upcast to float64
        if kind == 0:
            t = 0.5 + 0.5 * np.sin((2 * np.pi * rng.uniform(1.5, 8)) * (x * ca + x.T * sa) + rng.uniform(0, 6.3))
        elif kind == 1:
            t = np.clip((x - 0.5) * ca + (x.T - 0.5) * sa + 0.5, 0, 1)
        else:
            t = _value_noise(rng, S)
        # shape of radius r (fraction of the side), centred so that it stays inside, rotated by theta; rendered
        # at k·S, then mask m and texture tex·m are average-pooled: anti-aliased coverage in [0, 1]
        r = rng.uniform(0.2, 0.42)
        cx, cy, theta = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), rng.uniform(0, 2 * np.pi)
        c, s = math.cos(theta) / r, math.sin(theta) / r
        xs = ((np.arange(S * k, dtype=np.float32) + 0.5) / (S * k))[None, :]
        u, v = (xs - cx) * c + (xs.T - cy) * s, (xs.T - cy) * c - (xs - cx) * s
        m = _SHAPES[self.classes[label]](u, v, u * u + v * v).astype(np.float32)
        m, tex = _pool(np.stack([m, _texture(rng, u, v) * m]), k)        # (S, S) each
        b1, b2 = rng.random(3), rng.random(3)
        for _ in range(50):                           # foreground far from both background colours: always visible
            f1 = rng.random(3)
            if min(np.linalg.norm(f1 - b1), np.linalg.norm(f1 - b2)) > 0.4:
                break
        f2 = np.clip(f1 + rng.normal(0, 0.15, 3), 0, 1)                  # second tone of the texture
        # background b1 + (b2 − b1)·t under 1 − m, foreground f1 + (f2 − f1)·texture under m, all linear
        colours, fields = np.stack([b2 - b1, f1 - b1, f2 - f1], 1), np.stack([t * (1 - m), m, tex])
        image = b1[:, None, None] + np.tensordot(colours, fields, 1)      # (3, S, S)
        image += rng.normal(0, 0.01, image.shape)                        # a little sensor noise
        return torch.from_numpy(np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)), label


# ---------------------------------------------------------------------------------------------- real images
def _read_image(path):
    """Decode an image file as uint8 (3, H, W) RGB; DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith('I'):       # 16/32-bit grey (16-bit PNG): Pillow's convert('RGB') would clip at 255
                a = np.asarray(im, np.float64)
                a = a / 257 if im.mode.startswith('I;16') or a.max() > 255 else a
                im = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
            if im.mode in ('RGBA', 'LA', 'PA') or 'transparency' in im.info:
                # composite over black: the colour stored under transparent pixels is arbitrary (torchvision's
                # loader just drops alpha and shows it); black is the same for every file
                rgba = np.asarray(im.convert('RGBA'), np.float32)
                rgb = (rgba[..., :3] * rgba[..., 3:] / 255 + 0.5).astype(np.uint8)
            else:
                rgb = np.asarray(im.convert('RGB'))                     # L, P, CMYK, YCbCr, 1, ... → RGB
    except Exception as e:                                   # truncated data (OSError), broken zlib stream, ...
        raise DataError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from None
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _image_size(path):
    """(width, height) from the file's header; no pixels are decoded."""
    try:
        with Image.open(path) as im:                                     # lazy: reads the header only
            return im.size
    except Exception as e:                                 # (Pillow's UnidentifiedImageError repeats the path)
        why = ('no such file (gone, or a broken link)' if not path.is_file() else 'the file is empty' if path.stat().st_size == 0
               else 'not an image Pillow can identify' if isinstance(e, Image.UnidentifiedImageError) else f'{type(e).__name__}: {e}')
        raise DataError(f'{path}: cannot read image ({why})') from None


class ImageFolder(torch.utils.data.Dataset):
    """The torchvision layout root/<class>/<image files> (.png/.jpg/.jpeg, searched recursively, sorted).

    `classes` are the sorted class-folder names, `files` (FileList) and `labels` the images and their classes. Every
    file's header is read at start-up (size only, no pixels decoded; after the first start-up, from a manifest:
    data/manifest.py), so images smaller than `min_size` (the training crop) fail before training, not hours into it, and so do unreadable files (`strict`), or they are left out with their errors in
    `unreadable`. Returns (uint8 (3, H, W) RGB, label).
    """

    def __init__(self, root, min_size=0, strict=True):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f'--data {root}: no such directory')
        # hidden folders (.ipynb_checkpoints, .git) are not classes
        folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
        files = {d: [f'{d.name}/{rel}' for rel in list_files(d, IMAGE_EXTENSIONS)] for d in folders}   # str: data/manifest.py
        if not any(files.values()):
            raise DataError(f'--data {root}: no class folders with images under it (expected {root}/<class>/<image files>)')
        for d in folders:
            if not files[d]:
                raise DataError(f'{d}: no images ({"/".join(IMAGE_EXTENSIONS)}) in this class folder')
        self.classes = [d.name for d in folders]
        rels, labels = zip(*[(rel, label) for label, d in enumerate(folders) for rel in files[d]])
        headers, self.headers_read = read_headers(root, rels, _image_size, 'images')
        self.unreadable = [h for h in headers if isinstance(h, str)]
        if self.unreadable and (strict or len(self.unreadable) == len(rels)):      # or nothing is left to train on
            raise DataError(self.unreadable[0])
        kept = [(rel, label, size) for rel, label, size in zip(rels, labels, headers) if not isinstance(size, str)]
        for rel, _, (w, h) in kept:
            if min(w, h) < min_size:
                raise DataError(f'{root / rel}: the image is {w}×{h}, smaller than the {min_size}×{min_size} crop '
                                f'(--image-size {min_size}); use a smaller --image-size or drop the file')
        self.files = FileList(root, [rel for rel, _, _ in kept])                      # files[i] → Path
        self.labels = np.array([label for _, label, _ in kept], np.int32)              # (N,)

    @property
    def samples(self):
        """[(Path, label)], built when asked for (the dataset holds files and labels as arrays)."""
        return list(zip(self.files, self.labels.tolist()))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _read_image(self.files[i]), int(self.labels[i])


# ---------------------------------------------------------------------------------------------- augmentation
def _uniform(lo, hi, generator):
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _crop_box(height, width, min_scale, generator=None, ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) of a crop with area fraction in
    [min_scale, 1] and log-uniform aspect w/h in `ratio`; after 10 misses, a centre crop with the ratio clamped."""
    area = height * width
    for _ in range(10):
        target = area * _uniform(min_scale, 1.0, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    w, h = width, height                                               # fallback: the whole image or,
    if width / height < ratio[0]:                                      # if its aspect is out of range,
        h = round(width / ratio[0])                                    # a centre crop with the aspect clamped
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def _gray(img):
    """ITU-R 601-2 luma of (3, H, W) → (1, H, W), as PIL's convert('L')."""
    return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]


def augment(image, size, min_scale=0.08, generator=None, jitter=True):
    """data2vec-vision / BEiT pretraining augmentation: uint8 (3, H, W) → float32 (3, size, size) in [0, 1].

    BEiT's DataAugmentationForBEiT (microsoft/unilm, reused by data2vec vision) is torchvision's
    ColorJitter(0.4, 0.4, 0.4), RandomHorizontalFlip(0.5) and RandomResizedCrop(size, scale=(0.08, 1),
    ratio=(3/4, 4/3), bicubic). Here the crop comes first (jitter then works on size² pixels, not H·W; only
    the contrast mean changes: it is taken over the crop, not the whole image), then the flip, then the jitter
    with torchvision's tensor formulas. No mean/std normalisation (the model does it). All randomness comes
    from torch with `generator`, so a seeded generator makes it deterministic. jitter=False: MAE's augmentation
    (data2vec 2.0: RandomResizedCrop, scale (0.2, 1), and a flip).
    """
    top, left, h, w = _crop_box(image.shape[1], image.shape[2], min_scale, generator)
    img = image[:, top:top + h, left:left + w].float()                          # crop first: convert only the crop
    img = img / 255 if image.dtype == torch.uint8 else img
    img = F.interpolate(img[None], size=(size, size), mode='bicubic', align_corners=False,
                        antialias=True)[0].clamp(0, 1)                          # bicubic overshoots
    if torch.rand((), generator=generator) < 0.5:
        img = img.flip(-1)
    if not jitter:
        return img
    order = torch.randperm(3, generator=generator).tolist()             # as torchvision: order, then the factors
    factors = [_uniform(0.6, 1.4, generator) for _ in range(3)]
    jitters = (lambda x, f: x * f,                                      # brightness: blend with black
               lambda x, f: f * x + (1 - f) * _gray(x).mean(),          # contrast: blend with the mean grey level
               lambda x, f: f * x + (1 - f) * _gray(x))                 # saturation: blend with the grey image
    for k in order:
        img = jitters[k](img, factors[k]).clamp(0, 1)
    return img


def resize(image, size):
    """Evaluation view: uint8 (3, H, W) → float (3, size, size) in [0, 1]: shorter side to `size`, centre crop."""
    img = image.float() / 255
    if img.shape[1:] != (size, size):
        scale = size / min(img.shape[1:])
        h, w = max(size, round(img.shape[1] * scale)), max(size, round(img.shape[2] * scale))
        img = F.interpolate(img[None], size=(h, w), mode='bicubic', antialias=True)[0].clamp(0, 1)
        top, left = (h - size) // 2, (w - size) // 2
        img = img[:, top:top + size, left:left + size]
    return img


# ---------------------------------------------------------------------------------------------- pretraining batches
def pretraining_data(mcfg, cfg, resume_dir=None):
    """(dataset, collate) for train.py: --data (an ImageFolder) or the embedded shapes."""
    dataset = (ImageFolder(cfg.data, min_size=mcfg.image_size, strict=cfg.strict_data) if cfg.data else
               SyntheticImages(seed=0, image_size=mcfg.image_size))
    return dataset, partial(collate_v2 if mcfg.version == 2 else collate, mcfg=mcfg, cfg=cfg)


def collate(items, mcfg, cfg, generator=None):
    """Items → dict(source: augmented images (B, 3, H, W), mask: BEiT block masks (B, N) of round(mask_prob · N)
    patches), every random draw from `generator`. The teacher sees the same augmented image, unmasked."""
    grid, count = patch_mask_size(mcfg, cfg)
    images = torch.stack([augment(image, mcfg.image_size, cfg.min_crop_scale, generator, cfg.color_jitter) for image, _ in items])
    return dict(source=images, mask=block_mask(len(items), (grid, grid), count, cfg.mask_length, generator=generator))


def collate_v2(items, mcfg, cfg, generator=None):
    """data2vec 2.0: items → dict(source (B, 3, H, W), mask (B·M, N), ids_keep (B·M, N_keep), ids_restore (B·M, N)):
    augmented images as collate, then M = --clones inverse block masks per image (rows b·M … b·M + M − 1 are image b's),
    each keeping exactly int(N·(1 − p)) patches, and the order that keeps those."""
    images = torch.stack([augment(image, mcfg.image_size, cfg.min_crop_scale, generator, cfg.color_jitter) for image, _ in items])
    mask = inverse_block_mask(len(items) * cfg.clones, mcfg.image_size // mcfg.patch_size, cfg.mask_prob, cfg.mask_length,
                              cfg.mask_adjust, generator)                 # (B·M, N)
    ids_keep, ids_restore = visible_order(mask)
    return dict(source=images, mask=mask, ids_keep=ids_keep, ids_restore=ids_restore)


def bench_data(mcfg, cfg, size, seconds=None, seed=0):
    """bench.py: `size` uint8 noise images (a pool of 4 × --batch-size), the collate, and the shape: patches per image."""
    pool = torch.randint(0, 256, (4 * cfg.batch_size, 3, mcfg.image_size, mcfg.image_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))
    return Repeat(pool, 0, size), partial(collate_v2 if mcfg.version == 2 else collate, mcfg=mcfg, cfg=cfg), dict(seconds=None, tokens_per_sample=(mcfg.image_size // mcfg.patch_size) ** 2)


# ---------------------------------------------------------------------------------------------- labelled (fine-tuning)
def labelled_set(path, cfg, mcfg):
    """(ImageFolder of (image, label), the class names of its items); smaller images are resized up."""
    ds = ImageFolder(path, strict=cfg.strict_data)
    return ds, [ds.classes[label] for label in ds.labels.tolist()]


def embedded(split, mcfg):
    """The embedded shapes: label = i % 8 classes, so every class is as frequent."""
    return SyntheticImages(2048 if split == 'train' else 512, image_size=mcfg.image_size, split=split)


def labelled_collate(items, cfg, mcfg, train, generator=None):
    """→ dict(source (B, 3, H, W), labels (B,)): BEiT's augmentation while training (random resized crops of at least
    the recipe's --min-crop-scale of the image, a flip, colour jitter), a centre crop to evaluate."""
    images = [augment(x, mcfg.image_size, cfg.min_crop_scale, generator) if train else resize(x, mcfg.image_size)
              for x, _ in items]
    return dict(source=torch.stack(images), labels=torch.tensor([y for _, y in items]))
