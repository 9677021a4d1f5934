"""Image loading: EXIF orientation, modes, pad/resize, size guards and corrupt files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import save_image
from PIL import Image

from llava_mole.data import ImageLoadError, check_image_file, load_image, pixel_values, to_rgb
from llava_mole.data.images import expand_to_square, mean_colour, prepare_image


def _two_colour(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


def test_exif_orientation_is_applied(tmp_path):
    img = _two_colour()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.png", exif=exif)
    loaded = load_image(tmp_path / "rot.png")
    assert loaded.size == (20, 40)
    # after rotating clockwise, the left (red) half is at the top
    assert loaded.getpixel((10, 5)) == (255, 0, 0)
    assert loaded.getpixel((10, 35)) == (0, 0, 255)


def test_broken_exif_does_not_lose_the_image(tmp_path):
    img = _two_colour()
    exif = Image.Exif()
    exif[0x0112] = 99  # invalid orientation value
    img.save(tmp_path / "odd.png", exif=exif)
    assert load_image(tmp_path / "odd.png").size == (40, 20)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 90, (90, 90, 90)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 4000, (255, 255, 255)),  # min-max scaled, not clipped
        ("I", 70000, (255, 255, 255)),
        ("F", 0.5, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white background
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),
    ],
)
def test_modes_convert_to_rgb(mode, value, expected):
    img = Image.new(mode, (4, 4), value)
    if mode in ("I;16", "I", "F"):
        img.putpixel((0, 0), 0)  # a dark pixel so min-max scaling has a range
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
    assert rgb.getpixel((3, 3)) == expected


def test_sixteen_bit_png_round_trip(tmp_path):
    arr = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    rgb = load_image(tmp_path / "deep.png")
    assert [rgb.getpixel((x, y))[0] for y in range(2) for x in range(2)] == [0, 62, 125, 255]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_pad_uses_processor_mean_and_resize_is_plain(processor):
    ip = processor.image_processor
    mean = mean_colour(ip)
    assert mean == tuple(int(round(m * 255)) for m in ip.image_mean)
    padded = prepare_image(_two_colour((40, 20)), "pad", ip)
    assert padded.size == (40, 40)
    assert padded.getpixel((0, 0)) == mean and padded.getpixel((5, 20)) == (255, 0, 0)
    assert prepare_image(_two_colour((40, 20)), "resize", ip).size == (32, 32)
    assert expand_to_square(Image.new("RGB", (5, 5)), mean).size == (5, 5)
    with pytest.raises(ValueError, match="image_mode"):
        prepare_image(_two_colour(), "crop", ip)


@pytest.mark.parametrize("mode", ["pad", "resize"])
def test_pixel_values_shape_and_extreme_aspect_ratio(processor, mode):
    images = [_two_colour((40, 20)), Image.new("RGB", (1, 5000))]
    out = pixel_values(images, processor.image_processor, mode)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_size_guards(tmp_path):
    save_image(tmp_path / "ok.png", size=(40, 24))
    check_image_file(tmp_path / "ok.png")
    with pytest.raises(ImageLoadError) as info:
        check_image_file(tmp_path / "ok.png", max_pixels=100)
    assert info.value.reason == "image_too_large"
    # a header claiming 100000 x 100000 pixels: rejected before any decoding
    (tmp_path / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    for fn in (check_image_file, load_image):
        with pytest.raises(ImageLoadError) as info:
            fn(tmp_path / "bomb.png")
        assert info.value.reason == "image_too_large"
    (tmp_path / "big.png").write_bytes(_png_header_only(9000, 9000))  # under PIL's own limit
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "big.png")
    assert info.value.reason == "image_too_large"


def test_corrupt_and_missing_files(tmp_path):
    save_image(tmp_path / "ok.png", size=(64, 64))
    data = bytearray((tmp_path / "ok.png").read_bytes())
    (tmp_path / "truncated.png").write_bytes(bytes(data[: len(data) // 2]))
    data[len(data) // 2] ^= 0xFF  # breaks the IDAT checksum
    (tmp_path / "crc.png").write_bytes(bytes(data))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    for name in ("truncated.png", "crc.png", "junk.jpg"):
        with pytest.raises(ImageLoadError) as info:
            load_image(tmp_path / name)
        assert info.value.reason == "unreadable_image", name
    with pytest.raises(ImageLoadError) as info:
        check_image_file(tmp_path / "crc.png")
    assert info.value.reason == "unreadable_image"
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "missing.png")
    assert info.value.reason == "missing_image"
