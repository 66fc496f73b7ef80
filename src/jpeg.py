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
"""
from __future__ import annotations

import io
import os

from PIL import Image, ImageFile, UnidentifiedImageError

HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive
FILLER = b"\xff\x00" * 16
_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RST0-7, SOI


class CorruptJPEG(OSError):
    """The JPEG decodes, but its compressed data is damaged."""


def open_image(path: str | os.PathLike) -> tuple[Image.Image, bytes]:
    """(the image, not yet decoded, and the file's bytes) for ``load``: the file is read once."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return Image.open(io.BytesIO(data)), data
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}") from None


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
