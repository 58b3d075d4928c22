"""Image data: synthetic set, augmentation, image folders and bad files.   pytest tests/test_data_vision.py"""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from data import DataError
from data.vision import IMAGE_EXTENSIONS, ImageFolder, SyntheticImages, _crop_box, augment


# ---------------------------------------------------------------------------------------------- synthetic images
def test_synthetic_images_are_deterministic_varied_and_balanced():
    ds = SyntheticImages(size=64, seed=3)
    x, label = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.equal(x, SyntheticImages(size=64, seed=3)[5][0])                    # same (seed, split, index)
    assert not torch.equal(x, ds[6][0])
    assert not torch.equal(x, SyntheticImages(size=64, seed=4)[5][0])
    assert not torch.equal(x, SyntheticImages(size=64, seed=3, split='valid')[5][0])
    items = [ds[i] for i in range(64)]
    counts = np.bincount([lab for _, lab in items], minlength=len(ds.classes))
    assert len(ds.classes) == 8 and counts.min() == counts.max() == 8               # every class, balanced
    assert min(im.float().std().item() for im, _ in items) > 10                      # never a flat image
    colours = torch.stack([im.float().mean((1, 2)) for im, _ in items])             # (64, 3) mean colour
    assert colours.std(0).min() > 20                                                 # colours vary across images
    with pytest.raises(ValueError, match='split'):
        SyntheticImages(split='test')


def test_synthetic_label_is_the_shape_not_the_colour():
    """A nearest-class-mean classifier on mean colour, fitted on train, is near chance (1/8) on valid."""
    def colours(split):
        ds = SyntheticImages(size=256, split=split)
        return torch.stack([ds[i][0].float().mean((1, 2)) for i in range(256)]), torch.arange(256) % 8
    x, y = colours('train')
    means = torch.stack([x[y == c].mean(0) for c in range(8)])
    xv, yv = colours('valid')
    accuracy = (torch.cdist(xv, means).argmin(1) == yv).float().mean().item()
    assert accuracy < 0.3


def test_synthetic_edges_are_anti_aliased():
    """Supersampling leaves intermediate values at the shape's edge, not only background and foreground."""
    x = SyntheticImages(size=8, seed=0)[0][0].float()
    assert len(torch.unique(x[0])) > 50


def test_synthetic_works_at_224():
    x, label = SyntheticImages(size=4, image_size=224, split='valid')[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and label == 3 and x.float().std() > 10


# ---------------------------------------------------------------------------------------------- augmentation
def test_augment_shape_range_and_determinism():
    x = SyntheticImages(size=4, image_size=48)[1][0]
    out = augment(x, 32, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = augment(x, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, augment(x, 32, generator=torch.Generator().manual_seed(1)))
    noise = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)                    # extreme values, non-square
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        y = augment(noise, 24, generator=g)
        assert y.shape == (3, 24, 24) and y.min() >= 0 and y.max() <= 1


def test_crop_box_follows_torchvision():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = _crop_box(60, 80, 0.08, g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.08 * 4800 * 0.9 <= h * w <= 4800 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    assert _crop_box(64, 32, 1.0, g) == (10, 0, 43, 32)      # too tall for 3/4: centre crop 32 wide, 32/(3/4) high
    assert _crop_box(20, 100, 1.0, g) == (0, 36, 20, 27)     # too wide for 4/3: 20·4/3 wide, centred
    assert _crop_box(30, 30, 1.0, g) == (0, 0, 30, 30)       # scale 1 of a square image: all of it


def test_augment_with_full_scale_keeps_the_whole_image_and_flips_half_the_time():
    """On a grey image whose values keep clear of 0 and 1, the jitter is an affine map of the grey level
    (saturation does nothing to grey), so the output is a + b·input or a + b·flipped input."""
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(80, 140, 32)[None, :] + 20 * torch.sin(torch.arange(32.0))[:, None]   # left darker
    image = ramp.round().to(torch.uint8).expand(3, 32, 32)
    ref = image[0].float().flatten()
    seen = set()
    for _ in range(30):
        out = augment(image, 32, min_scale=1.0, generator=gen)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])           # grey stays grey
        for flipped in (False, True):
            cand = (image[0].flip(-1) if flipped else image[0]).float().flatten()
            if torch.corrcoef(torch.stack([out[0].flatten(), cand]))[0, 1] > 0.999:
                seen.add(flipped)
                assert (out[0, :, :16].mean() < out[0, :, 16:].mean()) != flipped
    assert seen == {False, True}
    assert abs(torch.corrcoef(torch.stack([ref, image[0].flip(-1).float().flatten()]))[0, 1]) < 0.99  # asymmetric


def test_jitter_changes_colours_but_keeps_a_flat_image_flat():
    gen = torch.Generator().manual_seed(0)
    flat = torch.tensor([200, 60, 30], dtype=torch.uint8)[:, None, None].expand(3, 16, 16)
    outs = torch.stack([augment(flat, 8, generator=gen) for _ in range(50)])          # (50, 3, 8, 8)
    assert (outs.amax((2, 3)) - outs.amin((2, 3))).max() < 1e-5                      # still one colour
    assert outs[:, :, 0, 0].std(0).min() > 0.03                                       # but a different one each time
    assert outs.min() >= 0 and outs.max() <= 1


# ---------------------------------------------------------------------------------------------- real images
def test_mnist_png_folder(shared_data):
    root = shared_data / 'images' / 'mnist_png' / 'train'
    ds = ImageFolder(root)
    assert ds.classes == [str(d) for d in range(10)] and len(ds) == 1000
    labels = [label for _, label in ds.samples]
    assert [labels.count(c) for c in range(10)] == [len(list((root / str(c)).glob('*.png'))) for c in range(10)]
    x, label = ds[250]
    assert x.dtype == torch.uint8 and x.shape == (3, 28, 28) and label == ds.samples[250][1] == 2
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]) and x.max() > 200       # grey → RGB, digit strokes
    assert np.array_equal(x[0].numpy(), np.asarray(Image.open(ds.samples[250][0])))
    with pytest.raises(DataError, match=r'\.png.*28×28, smaller than the 32×32 crop'):
        ImageFolder(root, min_size=32)


def _png(path, mode='RGB', size=(20, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return path


def test_image_modes_become_rgb(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (255, 255, 255), 0                                 # white, but fully transparent
    rgba[:4, ..., 3] = 255                                                           # top half opaque
    (tmp_path / 'a').mkdir()
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a' / 'rgba.png')
    _png(tmp_path / 'a' / 'palette.png', 'P')
    _png(tmp_path / 'a' / 'grey.jpg', 'L')
    _png(tmp_path / 'a' / 'cmyk.JPG', 'CMYK')
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / 'a' / 'grey16.png')   # opens as I;16
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    ds = ImageFolder(tmp_path)
    names = [p.name for p, _ in ds.samples]
    assert names == sorted(['rgba.png', 'palette.png', 'grey.jpg', 'cmyk.JPG', 'grey16.png'])
    images = {p.name: ds[i][0] for i, (p, _) in enumerate(ds.samples)}
    for name, x in images.items():
        assert x.dtype == torch.uint8 and x.shape[0] == 3, name
    assert (images['rgba.png'][:, :4] == 255).all() and (images['rgba.png'][:, 4:] == 0).all()   # over black
    palette = np.asarray(Image.open(tmp_path / 'a' / 'palette.png').convert('RGB'))
    assert np.array_equal(images['palette.png'].permute(1, 2, 0).numpy(), palette)
    assert (images['grey16.png'] == round(40000 / 257)).all()                        # scaled, not clipped to 255
    assert '.jpeg' in IMAGE_EXTENSIONS


def test_bad_files_get_errors_naming_them(tmp_path):
    for name, content in {'empty.png': b'', 'garbage.jpg': b'this is not a JPEG' * 20}.items():
        root = tmp_path / name.split('.')[0]
        _png(root / 'c' / 'fine.png')
        (root / 'c' / name).write_bytes(content)
        with pytest.raises(DataError, match=f'{name}: cannot read'):
            ImageFolder(root)


@pytest.mark.parametrize('fmt', ['png', 'jpg'])
def test_truncated_image(tmp_path, fmt):
    """Header intact, pixel data cut: found when the pixels are decoded (at __getitem__), naming the file."""
    assert not ImageFile.LOAD_TRUNCATED_IMAGES                                      # else Pillow pads silently
    path = _png(tmp_path / 'c' / f'cut.{fmt}', size=(64, 64))
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    try:
        ds = ImageFolder(tmp_path)
    except DataError as e:                                  # acceptable too: the header itself was cut
        assert f'cut.{fmt}' in str(e)
        return
    assert ds.samples[0][0].name == f'cut.{fmt}'
    with pytest.raises(DataError, match=f'cut.{fmt}: cannot decode'):
        ds[0]


def test_missing_or_empty_folders(tmp_path):
    with pytest.raises(DataError, match='no such directory'):
        ImageFolder(tmp_path / 'nope')
    with pytest.raises(DataError, match='no class folders with images'):
        ImageFolder(tmp_path)
    _png(tmp_path / 'loose.png')                                                    # a file, but no class folder
    with pytest.raises(DataError, match='no class folders with images'):
        ImageFolder(tmp_path)
    _png(tmp_path / 'cat' / 'nested' / 'x.png')                                     # found recursively
    (tmp_path / 'dog').mkdir()
    with pytest.raises(DataError, match=r'dog: no images'):
        ImageFolder(tmp_path)
    (tmp_path / 'dog').rmdir()
    assert ImageFolder(tmp_path).classes == ['cat']


def test_images_smaller_than_the_crop_are_an_error_naming_the_file(tmp_path):
    _png(tmp_path / 'a' / 'big.png', size=(40, 48))
    _png(tmp_path / 'a' / 'small.png', size=(40, 20))
    assert len(ImageFolder(tmp_path, min_size=20)) == 2
    with pytest.raises(DataError, match=r'small\.png: the image is 40×20, smaller than the 32×32 crop \(--image-size 32\)'):
        ImageFolder(tmp_path, min_size=32)
