"""Shared pytest fixtures."""

import pathlib

import pytest

from vlm import tiny


@pytest.fixture(scope="session")
def tiny_dir() -> pathlib.Path:
    """The cached tiny random Qwen3-VL checkpoint (untied lm_head), built on first use."""
    return tiny.tiny_path()


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny checkpoint with tied word embeddings, built for this session."""
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True)


# ---------------------------------------------------------------- bad and unusual image files


def _png_bomb(path: pathlib.Path, width: int, height: int) -> None:
    """A grayscale PNG of width x height black pixels: a few hundred KB on disk, width * height bytes decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte + one row of pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_test_images(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every kind of bad or unusual image file the demo and the CLIs must handle, by name (see README's table)."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    out: dict[str, pathlib.Path] = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        out[name] = folder / name
        image.save(out[name], **kw)

    def write(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)

    png, jpg = io.BytesIO(), io.BytesIO()
    rgb.save(png, "PNG")
    rgb.save(jpg, "JPEG")
    png, jpg = png.getvalue(), jpg.getvalue()
    idat = png.index(b"IDAT") + 4
    write("corrupt.png", png[:idat] + bytes(rng.integers(0, 256, len(png) - idat, dtype=np.uint8)))  # header kept
    write("truncated.jpg", jpg[: len(jpg) // 2])
    write("truncated.png", png[: len(png) // 2])
    write("empty.png", b"")
    write("text.png", b"just some notes, not an image\n")  # a non-image renamed .png
    _png_bomb(folder / "bomb.png", 20_000, 20_000)  # 400 MP in 0.4 MB: PIL's own bomb check refuses it
    _png_bomb(folder / "overcap.png", 11_000, 10_000)  # 110 MP: over the 100 MP hard cap
    out["bomb.png"], out["overcap.png"] = folder / "bomb.png", folder / "overcap.png"
    save("large.png", Image.new("RGB", (2400, 1800), (40, 90, 160)))  # 4.3 MP: downscaled, with a note
    save("1x1.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("1x4000.png", Image.new("RGB", (1, 4000), (200, 30, 30)))  # aspect 4000 > 200
    alpha = rng.integers(0, 256, (96, 128, 1), dtype=np.uint8)
    save("rgba.png", Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA"))
    save("la.png", Image.fromarray(np.concatenate([pixels[..., :1], alpha], -1), "LA"))
    save("palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (96, 128)).astype(np.uint16)))
    save("i16.tif", Image.fromarray(rng.integers(0, 65536, (96, 128)).astype("<u2")))
    save("float.tif", Image.fromarray(rng.random((96, 128)).astype(np.float32)))
    frames = [Image.new("RGB", (128, 96), c) for c in ("red", "green", "blue")]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown after a 90 degree clockwise turn
    save("exif_rotated.jpg", rgb, exif=exif.tobytes())
    return out


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> dict[str, pathlib.Path]:
    """make_test_images in a session temp dir."""
    return make_test_images(tmp_path_factory.mktemp("images"))
