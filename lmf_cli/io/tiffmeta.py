"""The ICC profile and EXIF of a 16-bit colour TIFF, which OpenCV writes without them.

Pillow cannot hold 16-bit colour samples and OpenCV's TIFF encoder writes no ICC profile or EXIF,
so a 16-bit colour TIFF is encoded by OpenCV and given its metadata here: a new first IFD is
appended with the old one's entries (which still point at the pixels, untouched) plus the ICC
profile (tag 34675) and the EXIF's tags, its EXIF and GPS sub-IFDs serialised by Pillow in the
file's byte order. The header is pointed at the new IFD; later pages stay chained after it.
"""

from __future__ import annotations

import struct

from PIL import Image

ICC_TAG, EXIF_IFD_TAG, GPS_IFD_TAG = 34675, 0x8769, 0x8825
# How a TIFF stores its pixels (sizes, strips, tiles, samples, resolution, ICC): not facts to carry.
TIFF_LAYOUT_TAGS = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 282, 283,
                              284, 290, 291, 296, 317, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532,
                              ICC_TAG})
UNDEFINED = 7


def add_metadata(tiff: bytes, icc: bytes | None, exif: bytes | None) -> bytes:
    """`tiff` (classic, not BigTIFF) with the ICC profile and EXIF in its first page.

    The file's own layout tags win over same-numbered EXIF tags; raises ValueError for a file
    that is not a classic TIFF.
    """
    if not icc and not exif:
        return tiff
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8 or struct.unpack(order + "H", tiff[2:4])[0] != 42:
        raise ValueError("not a classic TIFF")
    first = struct.unpack(order + "I", tiff[4:8])[0]
    entries = _entries(tiff, first, order)
    end = first + 2 + 12 * len(entries)
    next_ifd = tiff[end:end + 4]
    out = bytearray(tiff)

    def append(blob: bytes) -> int:
        if len(out) % 2:
            out.append(0)  # TIFF offsets are word aligned
        position = len(out)
        out.extend(blob)
        return position

    if exif:
        for tag, entry in _exif_entries(exif, order, len(out) + len(out) % 2, append).items():
            entries.setdefault(tag, entry)
    if icc:
        entries[ICC_TAG] = struct.pack(order + "HHII", ICC_TAG, UNDEFINED, len(icc), append(icc))
    ifd = struct.pack(order + "H", len(entries)) + b"".join(entries[t] for t in sorted(entries)) + next_ifd
    out[4:8] = struct.pack(order + "I", append(ifd))
    return bytes(out)


def _entries(data: bytes, offset: int, order: str) -> dict[int, bytes]:
    """The 12-byte entries of the IFD at `offset`, by tag."""
    if offset + 2 > len(data):
        raise ValueError("the first IFD lies outside the file")
    count = struct.unpack(order + "H", data[offset:offset + 2])[0]
    if offset + 2 + 12 * count + 4 > len(data):
        raise ValueError("the first IFD runs past the end of the file")
    rows = (data[offset + 2 + 12 * i:offset + 14 + 12 * i] for i in range(count))
    return {struct.unpack(order + "H", row[:2])[0]: row for row in rows}


def _exif_entries(exif: bytes, order: str, position: int, append) -> dict[int, bytes]:
    """The EXIF's first-IFD entries (layout tags left out), its data and sub-IFDs appended at `position`."""
    tags = Image.Exif()
    tags.load(exif)
    for tag in TIFF_LAYOUT_TAGS & set(tags):
        del tags[tag]
    tags.endian = order
    blob = tags.tobytes(position)[len(b"Exif\x00\x00") + 8:]  # an IFD laid out for `position`, then its data
    if append(blob) != position:
        raise ValueError("the EXIF was not placed where it was laid out")
    return _entries(blob, 0, order)
