"""Machine-readable frame counter that survives lossy video compression.

A 24-bit counter is drawn as one row of large black/white cells across the
bottom of the frame, so an end-to-end test can tell exactly which source
frame a decoded (possibly rescaled, blurred) picture came from.

Geometry (all coordinates are derived from the frame size ``W`` x ``H`` of
the image being stamped *or* read, so the code survives any rescaling)::

    strip rows  : y0 = floor(H * 11 / 12)  ..  H - 1   (bottom twelfth)
    cell i      : x  = floor(i * W / 40)   ..  floor((i + 1) * W / 40) - 1
                  for i in 0..39 (40 equal cells spanning the full width)
    cell colour : black = (0, 0, 0), white = (255, 255, 255); the whole
                  strip is painted, nothing of the picture shows through.

    cells 0..3   start guard   B W B W
    cells 4..27  counter bits  bit 23 (MSB) .. bit 0, white = 1
    cells 28..35 checksum      CRC bits 7 (MSB) .. 0,  white = 1
    cells 36..39 end guard     W B W B

    checksum = CRC-8/I-432-1 (a.k.a. CRC-8/ITU) of the counter as 3 bytes,
               big-endian: poly 0x07, init 0x00, no reflection,
               xorout 0x55.  (CRC of b"123456789" is 0xA1.)

Reading (what :func:`read` does, and what a JS port should do):

1. For every cell take the mean grey level, ``(R + G + B) / 3``, over the
   central half of the cell in both directions, i.e. x in
   ``[x0 + cw/4, x1 - cw/4)`` and y in ``[y0 + sh/4, y1 - sh/4)`` where cw
   and sh are the cell width and strip height in the image being read
   (bounds rounded to integers, at least one pixel).  Sampling only the
   centre keeps compression ringing and scaling blur at cell edges out.
2. black = mean of cells 0, 2, 37, 39; white = mean of cells 1, 3, 36, 38.
   Reject if ``white - black < 64`` (no code, e.g. black or noise frame).
3. threshold = (white + black) / 2, margin = (white - black) * 0.15.
   Every cell (guards included) must lie more than ``margin`` away from the
   threshold on its expected side (guards) or on either side (data);
   otherwise reject.
4. bits above threshold are 1; assemble counter and CRC, reject if the CRC
   does not match.

Channel order does not matter because the cells are grey: BGR, RGB, BGRA
and RGBA (alpha ignored) images all read the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

CELLS = 40
COUNTER_BITS = 24
CRC_BITS = 8
COUNTER_MASK = (1 << COUNTER_BITS) - 1
# Strip starts at this fraction of the height; 1/12 keeps cells tall enough
# (30 px at 360p, 15 px at 180p) to survive 16x16 macroblock quantisation.
STRIP_TOP_NUM = 11
STRIP_TOP_DEN = 12
START_GUARD = (0, 1, 0, 1)
END_GUARD = (1, 0, 1, 0)
DATA_FIRST_CELL = len(START_GUARD)
END_FIRST_CELL = CELLS - len(END_GUARD)
BLACK_REF_CELLS = (0, 2, 37, 39)
WHITE_REF_CELLS = (1, 3, 36, 38)
MIN_CONTRAST = 64.0
MARGIN_FRACTION = 0.15

assert DATA_FIRST_CELL + COUNTER_BITS + CRC_BITS == END_FIRST_CELL

U8Image = npt.NDArray[np.uint8]


def crc8(data: bytes) -> int:
    """CRC-8/I-432-1: poly 0x07, init 0, xorout 0x55 (JS-portable)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def _cell_bits(counter: int) -> list[int]:
    value = counter & COUNTER_MASK
    crc = crc8(value.to_bytes(3, "big"))
    data = [(value >> (COUNTER_BITS - 1 - i)) & 1 for i in range(COUNTER_BITS)]
    check = [(crc >> (CRC_BITS - 1 - i)) & 1 for i in range(CRC_BITS)]
    return [*START_GUARD, *data, *check, *END_GUARD]


def strip_top(height: int) -> int:
    """First row of the code strip for a frame of the given height."""
    return height * STRIP_TOP_NUM // STRIP_TOP_DEN


def cell_x(index: int, width: int) -> int:
    """Left edge of cell ``index`` (``index == CELLS`` gives the right edge)."""
    return index * width // CELLS


def stamp(img: U8Image, counter: int) -> None:
    """Draw ``counter`` (taken modulo 2**24) into the bottom strip of ``img``.

    ``img`` is an HxWx3 (or HxWx4 / HxW) uint8 array, modified in place.
    """
    height, width = img.shape[:2]
    if width < 160 or height < 120:
        raise ValueError(f"frame {width}x{height} too small for framecode")
    y0 = strip_top(height)
    for i, bit in enumerate(_cell_bits(counter)):
        img[y0:height, cell_x(i, width) : cell_x(i + 1, width)] = 255 if bit else 0


def _cell_means(strip: npt.NDArray[Any], width: int) -> list[float]:
    strip_h = strip.shape[0]
    y_in = strip_h // 4
    y_a, y_b = y_in, max(strip_h - y_in, y_in + 1)
    means: list[float] = []
    for i in range(CELLS):
        x0, x1 = cell_x(i, width), cell_x(i + 1, width)
        x_in = (x1 - x0) // 4
        x_a, x_b = x0 + x_in, max(x1 - x_in, x0 + x_in + 1)
        # Mean over all (colour) channels at once equals the mean of (R+G+B)/3.
        means.append(float(strip[y_a:y_b, x_a:x_b].mean()))
    return means


def read(img: npt.NDArray[Any]) -> int | None:
    """Decode the counter from an HxW, HxWx3 (BGR/RGB) or HxWx4 image.

    Returns None when no valid code is present (low contrast, guard
    mismatch, ambiguous cell or checksum failure).
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWxC image, got shape {img.shape}")
    height, width = img.shape[:2]
    if width < CELLS or height < STRIP_TOP_DEN:
        return None
    strip = img[strip_top(height) :]
    if strip.ndim == 3:
        # Only the first three channels are colour; alpha must not dilute.
        strip = strip[:, :, :3]
    means = _cell_means(strip, width)

    black = sum(means[i] for i in BLACK_REF_CELLS) / len(BLACK_REF_CELLS)
    white = sum(means[i] for i in WHITE_REF_CELLS) / len(WHITE_REF_CELLS)
    contrast = white - black
    if contrast < MIN_CONTRAST:
        return None
    threshold = (white + black) / 2
    margin = contrast * MARGIN_FRACTION

    bits: list[int] = []
    for value in means:
        if abs(value - threshold) <= margin:
            return None
        bits.append(1 if value > threshold else 0)
    if tuple(bits[:DATA_FIRST_CELL]) != START_GUARD:
        return None
    if tuple(bits[END_FIRST_CELL:]) != END_GUARD:
        return None

    counter = 0
    for bit in bits[DATA_FIRST_CELL : DATA_FIRST_CELL + COUNTER_BITS]:
        counter = (counter << 1) | bit
    crc = 0
    for bit in bits[DATA_FIRST_CELL + COUNTER_BITS : END_FIRST_CELL]:
        crc = (crc << 1) | bit
    if crc != crc8(counter.to_bytes(3, "big")):
        return None
    return counter


def read_rgba(data: bytes | bytearray | memoryview, width: int, height: int) -> int | None:
    """Decode from a flat RGBA buffer, e.g. a browser canvas ``getImageData``."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if arr.size != width * height * 4:
        raise ValueError(f"RGBA buffer of {arr.size} bytes is not {width}x{height}x4")
    return read(arr.reshape(height, width, 4))


# Same algorithm as read(), for browser tests: evaluate this source in a page,
# then call framecodeRead(ctx.getImageData(0, 0, w, h)) -> number | null.
JS_READER = r"""
function framecodeRead(imageData) {
  const W = imageData.width, H = imageData.height, d = imageData.data;
  const CELLS = 40;
  if (W < CELLS || H < 12) return null;
  const y0 = Math.floor(H * 11 / 12), sh = H - y0;
  const yin = Math.floor(sh / 4), ya = y0 + yin, yb = Math.max(H - yin, ya + 1);
  const means = [];
  for (let i = 0; i < CELLS; i++) {
    const x0 = Math.floor(i * W / CELLS), x1 = Math.floor((i + 1) * W / CELLS);
    const xin = Math.floor((x1 - x0) / 4), xa = x0 + xin;
    const xb = Math.max(x1 - xin, xa + 1);
    let sum = 0, n = 0;
    for (let y = ya; y < yb; y++) {
      for (let x = xa; x < xb; x++) {
        const o = (y * W + x) * 4;
        sum += (d[o] + d[o + 1] + d[o + 2]) / 3; n++;
      }
    }
    means.push(sum / n);
  }
  const black = (means[0] + means[2] + means[37] + means[39]) / 4;
  const white = (means[1] + means[3] + means[36] + means[38]) / 4;
  const contrast = white - black;
  if (contrast < 64) return null;
  const thr = (white + black) / 2, margin = contrast * 0.15;
  const bits = [];
  for (const v of means) {
    if (Math.abs(v - thr) <= margin) return null;
    bits.push(v > thr ? 1 : 0);
  }
  const guard = [0, 1, 0, 1, 1, 0, 1, 0];
  const got = bits.slice(0, 4).concat(bits.slice(36));
  for (let i = 0; i < 8; i++) if (got[i] !== guard[i]) return null;
  let counter = 0, crcBits = 0;
  for (let i = 4; i < 28; i++) counter = counter * 2 + bits[i];
  for (let i = 28; i < 36; i++) crcBits = crcBits * 2 + bits[i];
  let crc = 0;
  for (const byte of [(counter >> 16) & 255, (counter >> 8) & 255, counter & 255]) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = crc & 0x80 ? ((crc << 1) ^ 0x07) & 255 : (crc << 1) & 255;
  }
  return (crc ^ 0x55) === crcBits ? counter : null;
}
"""
