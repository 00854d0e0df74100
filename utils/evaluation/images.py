"""Image helpers shared by the training-image fetcher and the similarity measures: format sniffing, full decoding
with classification (ok, not an image, truncated, too large, placeholder), and RGB conversion."""
import io

from ..cli import one_line

MIN_SIDE = 32            # smaller images are thumbnails or tracking pixels, not the training image
PLACEHOLDER_STD = 1.0    # every RGB channel with std below this (0-255 scale) = a single-colour placeholder
MAX_PIXELS = 50_000_000  # refuse to decode larger images (memory), reported as too_large
MAX_FILE_BYTES = 100 << 20  # the largest image file read from disk (generated or training image)
_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
        "TIFF": ".tif", "ICO": ".ico", "AVIF": ".avif"}
# File suffixes taken for images wherever the project lists a folder (training images, generated images).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ico", ".avif")


def inspect_image(data, min_side=MIN_SIDE, max_pixels=MAX_PIXELS):
    """Decode bytes fully with PIL and classify them.

    Returns dict(status, detail, width, height, ext): status "ok", "not_image" (undecodable, e.g. an HTML page),
    "truncated", "too_large" (more than max_pixels), or "placeholder" (a side < min_side, or one colour).
    """
    from PIL import Image, ImageStat, UnidentifiedImageError
    out = dict(status="ok", detail="", width=None, height=None, ext=None)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            out["width"], out["height"] = im.size
            if im.size[0] * im.size[1] > max_pixels:
                return dict(out, status="too_large", detail=f"{im.size[0]}x{im.size[1]} pixels")
            im.load()  # the full decode: truncated or corrupt data raises here, not at open()
            rgb = to_rgb(im)
    except Image.DecompressionBombError as e:
        return dict(out, status="too_large", detail=one_line(e))
    except UnidentifiedImageError:
        return dict(out, status="not_image", detail=sniff(data))
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        status = "truncated" if "truncat" in str(e).lower() else "not_image"
        return dict(out, status=status, detail=f"{fmt or 'image'} does not decode: {one_line(e)}"[:200])
    out["ext"] = _EXT.get(fmt, "." + (fmt or "img").lower())
    w, h = out["width"], out["height"]
    if min(w, h) < min_side:
        return dict(out, status="placeholder", detail=f"only {w}x{h} pixels (< {min_side})")
    if max(ImageStat.Stat(rgb).stddev) < PLACEHOLDER_STD:
        return dict(out, status="placeholder", detail="single colour " + "#%02x%02x%02x" % rgb.getpixel((0, 0)))
    return out


def to_rgb(im):
    """RGB copy of a PIL image; transparent areas become white (how the page showed them), not black."""
    from PIL import Image
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def sniff(data):
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<head" in head:
        return "an HTML page, not an image"
    if not data:
        return "empty body"
    if head.startswith((b"{", b"[")):
        return "JSON, not an image"
    return f"unknown format (starts with {data[:8]!r})"
