"""Decode a JPEG strictly: damaged compressed data is an error, not a picture with wrong pixels.

libjpeg only *warns* when a scan's compressed (entropy-coded) data is damaged ("Corrupt JPEG data: premature end of
data segment", "... extraneous bytes before marker"), fills in what it could not decode and carries on; Pillow
drops those warnings, so a JPEG with bytes overwritten inside its scan loads without an exception and is mostly
wrong pixels. ``load`` decodes with Pillow's own JPEG decoder (one decode, as ``Image.load`` does) but feeds it the
file in pieces, cut where each entropy-coded segment (a scan, or a restart interval) ends, and watches where the
decoder stops:

- *too early*: given the last scan without its last byte, the decoder has already finished the image. An intact
  scan's last byte holds bits the decoder must read, so the decoder skipped data it could not use.
- *too late*: at the end of a segment the decoder is given 16 bytes of filler (stuffed 0xFF bytes, which no
  Huffman code consumes usefully) instead of the marker. An intact segment is complete by then: the decoder
  finishes the image, or reads the filler as the junk before the next marker and consumes all of it. A damaged
  one is still decoding, consumes the filler as data and stops inside it.

Damage that resynchronises exactly (libjpeg itself sees nothing) passes, as do the rare cases where the decoder
ends within a few bytes of where it should (under about 9 too early, or a few blocks too late). Both checks are
made at the end of the last scan; in earlier scans and restart intervals only the second, plus the restart
markers' RST0..RST7 cycle (a progressive JPEG damaged in an early scan, or one damaged within a restart interval
without losing its marker, may pass). Arithmetic-coded JPEGs are decoded as Pillow does, unchecked.

``decode`` is the one way the project decodes an image: bounded before any work (a file over MAX_IMAGE_BYTES is
refused before it is read, one whose header declares over MAX_IMAGE_PIXELS before it is decoded; the environment
variables MILK10K_MAX_IMAGE_BYTES and MILK10K_MAX_IMAGE_PIXELS raise them for trusted files), decoded strictly
(``load``) and turned upright as a viewer shows it (the EXIF orientation applied).
"""
from __future__ import annotations

import io
import os

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive
FILLER = b"\xff\x00" * 16
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RST0-7, SOI
MAX_IMAGE_BYTES = 50 * 2**20  # the release's JPEGs are 12-100 KB; a full-resolution 50 MP photo stays under 50 MiB
MAX_IMAGE_PIXELS = 50_000_000  # MILK10k's images are 600x450; 50 MP admits a phone's full-resolution photo (8160x6120)
TURNED = (5, 6, 7, 8)  # EXIF orientations stored a quarter turn (and maybe a flip) from upright: w and h swap


class CorruptJPEG(OSError):
    """The JPEG decodes, but its compressed data is damaged."""


class ImageTooLarge(ValueError):
    """An image file refused before it is decoded: larger than a limit on untrusted input (or a limit set wrongly)."""


def limit(name: str, default: int) -> int:
    """The environment variable ``name`` as a positive whole number (read at each call), else ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) == 0:
        raise ImageTooLarge(f"{name}={value!r} is not a positive whole number; unset it or give one")
    return int(value)


def frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a JPEG's frame header declares (the largest, if there are several), or None."""
    n, pos, size = len(data), 2, None
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    while pos + 3 < n and data[pos] == 0xFF:
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1] if pos + 1 < n else 0xD9
        if marker in (0xD9, 0xDA):
            break
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 8 < n:
            width, height = (data[pos + 7] << 8) | data[pos + 8], (data[pos + 5] << 8) | data[pos + 6]
            if size is None or width * height > size[0] * size[1]:
                size = (width, height)
        if pos + 3 >= n:
            break
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return size


def _check_pixels(size: tuple[int, int], most: int) -> None:
    if size[0] * size[1] > most:
        raise ImageTooLarge(f"its header declares {size[0]}x{size[1]} pixels, over the limit of {most} for an image "
                            "(MAX_IMAGE_PIXELS; MILK10k's images are 600x450): if the file is trusted, set "
                            "MILK10K_MAX_IMAGE_PIXELS to a higher number of pixels")


def open_image(path: str | os.PathLike) -> tuple[Image.Image, bytes]:
    """(the image, not yet decoded, and the file's bytes) for ``load``: the file is read once. ImageTooLarge: a file
    of over MAX_IMAGE_BYTES (not read), or whose header declares over MAX_IMAGE_PIXELS (not decoded)."""
    most_bytes = limit("MILK10K_MAX_IMAGE_BYTES", MAX_IMAGE_BYTES)
    most_pixels = limit("MILK10K_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > most_bytes:
            raise ImageTooLarge(f"{size} bytes, over the limit of {most_bytes} for an image file (MAX_IMAGE_BYTES; "
                                "MILK10k's JPEGs are 12-100 KB): if the file is trusted, set MILK10K_MAX_IMAGE_BYTES "
                                "to a higher number of bytes")
        data = fh.read(size)  # no further: a file still growing, or a device, is not read on and on
    _check_pixels(frame_size(data) or (0, 0), most_pixels)
    if Image.MAX_IMAGE_PIXELS and most_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = most_pixels  # a limit raised for trusted files raises Pillow's own as well
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None
    try:
        _check_pixels(img.size, most_pixels)  # another format's header, as Pillow read it
    except ImageTooLarge:
        img.close()
        raise
    return img, data


def decode(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """The JPEG at ``path`` as an RGB image, upright as a viewer shows it: decoded strictly (``load``), then turned
    by its EXIF orientation (any of the eight). ``draft`` (width, height of the upright picture): decode at the
    smallest DCT scale at least that large. Raises ImageTooLarge (``open_image``), CorruptJPEG, and OSError for a
    file that is not a JPEG or does not decode."""
    img, data = open_image(path)
    with img:
        if img.format != "JPEG":
            raise OSError(f"format is {img.format}, not JPEG")
        if draft:
            turned = img.getexif().get(ExifTags.Base.Orientation) in TURNED
            img.draft("RGB", (draft[1], draft[0]) if turned else draft)
        load(img, data)
        ImageOps.exif_transpose(img, in_place=True)
        return img.convert("RGB")


def segment_ends(data: bytes) -> tuple[int | None, list[int], int]:
    """(frame marker, where each entropy-coded segment ends, number of scans). A segment ends at the first byte of
    the marker after it (fill bytes included): a restart marker inside a scan, or whatever follows the scan.
    A scan whose end is missing (a truncated file) adds no end. Restart markers out of their RST0..RST7 cycle
    (one overwritten, or lost) raise CorruptJPEG."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None, [], 0
    pos, frame, ends, scans = 2, None, [], 0
    while pos + 3 < n and data[pos] == 0xFF:
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1] if pos + 1 < n else 0xD9
        if marker == 0xD9:
            break
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if pos + 3 >= n:
            break
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = marker
        if marker != 0xDA:
            pos = end
            continue
        scans += 1
        q, restarts = end, 0
        while True:  # the entropy-coded data runs to the next 0xFF that is neither stuffed (FF 00) nor a fill byte
            q = data.find(b"\xff", q)
            if q < 0 or q + 1 >= n:
                return frame, ends, scans
            r = q
            while r + 1 < n and data[r + 1] == 0xFF:
                r += 1
            if r + 1 >= n:
                return frame, ends, scans
            if data[r + 1] == 0x00:
                q = r + 2
                continue
            ends.append(q)
            if 0xD0 <= data[r + 1] <= 0xD7:  # a restart marker: the scan goes on after it
                if data[r + 1] != 0xD0 + restarts % 8:
                    raise CorruptJPEG(f"corrupt JPEG data: restart marker RST{data[r + 1] - 0xD0} at byte {q} of "
                                      f"{n} where RST{restarts % 8} was due; bytes inside the image were "
                                      "overwritten or lost")
                restarts += 1
                q = r + 2
                continue
            pos = q
            break
    return frame, ends, scans


def load(img: Image.Image, data: bytes) -> None:
    """Decode ``img``, opened from the bytes ``data`` (``img.draft`` may have been applied), like ``img.load()``;
    raise CorruptJPEG when its compressed data is damaged (see the module docstring) and OSError where
    ``img.load()`` would."""
    tile = getattr(img, "tile", None)
    frame, ends, scans = segment_ends(data)
    if (img.format != "JPEG" or not tile or len(tile) != 1 or tile[0][0] != "jpeg" or tile[0][2] != 0
            or frame not in HUFFMAN_FRAMES or not ends or ends[-1] < 2):
        img.load()
        return
    name, extents, _, args = tile[0]
    img.load_prepare()
    decoder = Image._getdecoder(img.mode, name, args, img.decoderconfig)
    decoder.setimage(img.im, extents)
    pending = b""

    def feed(chunk: bytes) -> tuple[bool, int]:
        """(finished, bytes left unconsumed)"""
        nonlocal pending
        pending += chunk
        used, err = decoder.decode(pending)
        if used < 0:
            if err < 0:
                raise ImageFile._get_oserror(err, encoder=False)
            return True, 0
        pending = pending[used:]
        return False, len(pending)

    try:
        pos = 0
        for i, end in enumerate(ends):
            last = i == len(ends) - 1
            if last:
                if feed(data[pos:end - 1])[0]:
                    raise CorruptJPEG(f"corrupt JPEG data: the decoder finished before the end of the compressed "
                                      f"data (byte {end} of {len(data)}); bytes inside the image were overwritten")
                done, _ = feed(data[end - 1:end])
            else:
                done, _ = feed(data[pos:end])
            if not done:
                done, left = feed(FILLER)
                if not done and (left or (last and scans == 1)):
                    raise CorruptJPEG(f"corrupt JPEG data: premature end of data segment at byte {end} of "
                                      f"{len(data)}; bytes inside the image were overwritten or lost")
                pending = b""
            if done and not last:
                raise CorruptJPEG(f"corrupt JPEG data: the decoder finished at byte {end} of {len(data)}, before "
                                  "the last scan; bytes inside the image were overwritten")
            if done:
                break
            pos = end
        else:
            if not feed(data[pos:])[0]:
                raise OSError(f"image file is truncated ({len(pending)} bytes not processed)")
    finally:
        decoder.cleanup()
    img.tile = []
    img.readonly = 0
