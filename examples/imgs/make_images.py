"""Writes the five example images: one public-domain photo from scikit-image, four labelled PIL drawings.

    python examples/imgs/make_images.py        # needs scikit-image only for coffee_laptop.png

The original project's photos are not available; see README.md beside this file for what each one is.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
W, H = 512, 384


def label(img: Image.Image, text: str = "stand-in drawing") -> Image.Image:
    """Stamp a visible 'stand-in' label in the bottom-left corner."""
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=20)
    x0, y0, x1, y1 = d.textbbox((12, H - 36), text, font=font)
    d.rectangle((x0 - 6, y0 - 4, x1 + 6, y1 + 4), fill=(255, 255, 255), outline=(0, 0, 0), width=2)
    d.text((12, H - 36), text, fill=(0, 0, 0), font=font)
    return img


def sky(d: ImageDraw.ImageDraw, top: tuple[int, int, int], bottom: tuple[int, int, int], h: int = H) -> None:
    for y in range(h):
        t = y / max(h - 1, 1)
        d.line((0, y, W, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))


def panda_climbing() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    sky(d, (150, 200, 150), (60, 120, 60))
    for x in range(0, W, 40):  # background bamboo
        d.rectangle((x + 10, 0, x + 18, H), fill=(90, 150, 70))
    d.rectangle((220, 0, 300, H), fill=(110, 75, 45))  # tree trunk
    for y in range(0, H, 30):
        d.line((225, y, 295, y + 8), fill=(90, 60, 35), width=2)
    cx, cy = 260, 190
    d.ellipse((cx - 70, cy - 40, cx + 70, cy + 110), fill=(245, 245, 240), outline=(30, 30, 30), width=2)  # body
    d.ellipse((cx - 80, cy + 10, cx - 40, cy + 90), fill=(25, 25, 25))  # legs gripping the trunk
    d.ellipse((cx + 40, cy + 10, cx + 80, cy + 90), fill=(25, 25, 25))
    d.ellipse((cx - 95, cy - 50, cx - 45, cy + 10), fill=(25, 25, 25))  # arms reaching up
    d.ellipse((cx + 45, cy - 50, cx + 95, cy + 10), fill=(25, 25, 25))
    hx, hy = cx, cy - 80
    d.ellipse((hx - 62, hy - 70, hx - 22, hy - 30), fill=(25, 25, 25))  # ears
    d.ellipse((hx + 22, hy - 70, hx + 62, hy - 30), fill=(25, 25, 25))
    d.ellipse((hx - 55, hy - 55, hx + 55, hy + 45), fill=(250, 250, 245), outline=(30, 30, 30), width=2)  # head
    d.ellipse((hx - 35, hy - 20, hx - 10, hy + 10), fill=(25, 25, 25))  # eye patches
    d.ellipse((hx + 10, hy - 20, hx + 35, hy + 10), fill=(25, 25, 25))
    d.ellipse((hx - 26, hy - 10, hx - 18, hy - 2), fill=(255, 255, 255))
    d.ellipse((hx + 18, hy - 10, hx + 26, hy - 2), fill=(255, 255, 255))
    d.ellipse((hx - 9, hy + 12, hx + 9, hy + 24), fill=(25, 25, 25))  # nose
    return label(img)


def mountain_landscape() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    sky(d, (90, 150, 230), (200, 225, 250))
    d.ellipse((400, 40, 450, 90), fill=(255, 240, 180))  # sun
    ranges = [
        (
            (120, 130, 160),
            [(0, 260), (90, 120), (170, 210), (260, 80), (360, 200), (440, 110), (512, 190), (512, 300), (0, 300)],
        ),
        (
            (80, 95, 110),
            [(0, 280), (60, 200), (150, 250), (230, 170), (330, 260), (420, 190), (512, 250), (512, 300), (0, 300)],
        ),
    ]
    for colour, pts in ranges:
        d.polygon(pts, fill=colour)
    for px, py in [(90, 120), (260, 80), (440, 110)]:  # snow caps
        d.polygon(
            [(px, py), (px - 28, py + 35), (px - 8, py + 28), (px + 6, py + 38), (px + 26, py + 30)],
            fill=(250, 250, 255),
        )
    d.rectangle((0, 300, W, H), fill=(70, 130, 80))  # meadow
    d.ellipse((120, 315, 420, 370), fill=(80, 140, 200))  # lake
    rng = random.Random(3)
    for _ in range(14):  # pine trees
        x = rng.choice([rng.randint(0, 110), rng.randint(430, 500)])
        y = rng.randint(290, 340)
        d.polygon([(x, y - 40), (x - 12, y), (x + 12, y)], fill=(30, 80, 40))
    return label(img)


def f35_takeoff() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    sky(d, (120, 170, 225), (215, 230, 245))
    d.polygon([(0, 330), (W, 300), (W, H), (0, H)], fill=(90, 90, 95))  # runway
    for i in range(6):
        x = 40 + i * 85
        d.polygon(
            [(x, 343 - i * 5), (x + 40, 340 - i * 5), (x + 40, 344 - i * 5), (x, 347 - i * 5)], fill=(240, 240, 240)
        )

    def rot(
        pts: list[tuple[float, float]], ang: float = -18, cx: float = 260, cy: float = 190
    ) -> list[tuple[float, float]]:
        a = math.radians(ang)
        return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in pts]

    d.polygon(rot([(-175, -6), (-205, -14), (-205, 14), (-175, 6)]), fill=(255, 150, 40))  # afterburner
    d.polygon(rot([(-185, -4), (-198, -7), (-198, 7), (-185, 4)]), fill=(255, 240, 160))
    body = [(170, 0), (120, -12), (-170, -14), (-180, 0), (-170, 14), (120, 12)]
    d.polygon(rot(body), fill=(105, 110, 115), outline=(60, 60, 65))
    d.polygon(rot([(40, -12), (-60, -95), (-95, -95), (-80, -12)]), fill=(95, 100, 105), outline=(60, 60, 65))  # wings
    d.polygon(rot([(40, 12), (-60, 95), (-95, 95), (-80, 12)]), fill=(85, 90, 95), outline=(60, 60, 65))
    d.polygon(
        rot([(-120, -12), (-165, -45), (-180, -45), (-170, -12)]), fill=(95, 100, 105), outline=(60, 60, 65)
    )  # tails
    d.polygon(rot([(-120, 12), (-165, 45), (-180, 45), (-170, 12)]), fill=(85, 90, 95), outline=(60, 60, 65))
    d.polygon(rot([(125, -6), (85, -9), (85, 9), (125, 6)]), fill=(200, 170, 60))  # canopy
    return label(img)


def stadium_aerial() -> Image.Image:
    img = Image.new("RGB", (W, H), (70, 75, 80))
    d = ImageDraw.Draw(img)
    rng = random.Random(7)
    for x in range(0, W, 64):  # surrounding city blocks
        for y in range(0, H, 64):
            d.rectangle((x + 4, y + 4, x + 56, y + 56), fill=tuple(rng.randint(110, 170) for _ in range(3)))
    d.ellipse((36, 22, 476, 362), fill=(150, 150, 155), outline=(40, 40, 45), width=4)  # stands
    for _ in range(2200):  # crowd
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.62, 0.96)
        x, y = 256 + r * 215 * math.cos(a), 192 + r * 165 * math.sin(a)
        d.point((x, y), fill=rng.choice([(200, 40, 40), (240, 240, 240), (40, 60, 190), (230, 200, 50)]))
    d.rounded_rectangle((136, 112, 376, 272), radius=8, fill=(60, 150, 60))  # pitch
    for i in range(8):
        d.rectangle((136 + i * 30, 112, 151 + i * 30, 272), fill=(70, 165, 70))
    line = (245, 245, 245)
    d.rectangle((140, 116, 372, 268), outline=line, width=2)
    d.line((256, 116, 256, 268), fill=line, width=2)
    d.ellipse((232, 168, 280, 216), outline=line, width=2)
    d.rectangle((140, 160, 172, 224), outline=line, width=2)
    d.rectangle((340, 160, 372, 224), outline=line, width=2)
    return label(img)


def coffee_laptop() -> Image.Image:
    from skimage import data  # public-domain photo (CC0), shipped inside the scikit-image wheel

    img = Image.fromarray(data.coffee())  # 600 x 400
    return img.resize((480, 320), Image.Resampling.LANCZOS)  # keeps the PNG under ~300 KB


def main() -> None:
    for name, make in [
        ("panda_climbing", panda_climbing),
        ("coffee_laptop", coffee_laptop),
        ("mountain_landscape", mountain_landscape),
        ("f35_takeoff", f35_takeoff),
        ("stadium_aerial", stadium_aerial),
    ]:
        out = HERE / f"{name}.png"
        make().save(out, optimize=True)
        print(out, out.stat().st_size // 1024, "KB")


if __name__ == "__main__":
    main()
