#!/usr/bin/python3
"""Wanted ranges for the transfer tests and the benchmark: sets shaped like
the missing chunks of an adaptive update, the file format stream-fetch and
http-fetch read (--ranges), what covers a set in stream blocks, and the
identity a progress record names (ranges.h).
"""

import hashlib
import random
import struct


def canonical(ranges):
    """Sorted, touching ranges merged; [(offset, length)]."""
    out = []
    for off, length in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def chunk_like(size, seed, mean=16 * 1024, missing=0.3, run=3, lo=512, hi=None):
    """Missing chunks of a content-defined chunking: chunk sizes around
    `mean` (exponential, clipped to [lo, hi]), missing in runs of `run`
    chunks on average, about `missing` of the file. Touching chunks stay
    separate ranges (as a chunk list gives them)."""
    rng = random.Random(seed)
    hi = hi or 4 * mean
    chunks, pos = [], 0
    while pos < size:
        n = int(min(max(rng.expovariate(1.0 / mean), lo), hi))
        n = min(n, size - pos)
        chunks.append((pos, n))
        pos += n
    out, i = [], 0
    start_p = missing / run
    while i < len(chunks):
        if rng.random() < start_p:
            k = max(1, int(rng.expovariate(1.0 / run) + 0.5))
            out.extend(chunks[i:i + k])
            i += k
        else:
            i += 1
    return out


def write_file(path, ranges):
    with open(path, "w") as f:
        for off, length in ranges:
            f.write("%d %d\n" % (off, length))


def total(ranges):
    return sum(length for _, length in ranges)


def cover(ranges, size, block):
    """The blocks holding a wanted byte, and their bytes."""
    blocks = set()
    for off, length in ranges:
        blocks.update(range(off // block, (off + length - 1) // block + 1))
    nbytes = sum(min(block, size - b * block) for b in blocks)
    return blocks, nbytes


def identity(ranges):
    """ranges_hash(): SHA-256 of the canonical set, u64 LE offset, length."""
    h = hashlib.sha256()
    for off, length in canonical(ranges):
        h.update(struct.pack("<QQ", off, length))
    return h.hexdigest()


def prefill(path, size, byte=0x5A):
    """The output file before a fetch: bytes outside the ranges must stay."""
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)


def check_file(testcase, path, data, ranges, byte=0x5A):
    """The wanted bytes are the source's, every other byte is untouched."""
    with open(path, "rb") as f:
        got = f.read()
    testcase.assertEqual(len(got), len(data))
    pos = 0
    untouched = bytes([byte])
    for off, length in canonical(ranges):
        testcase.assertTrue(got[pos:off] == untouched * (off - pos),
                            "bytes %d..%d outside the ranges were written" % (pos, off))
        testcase.assertTrue(got[off:off + length] == data[off:off + length],
                            "wanted bytes %d..%d differ from the source" % (off, off + length))
        pos = off + length
    testcase.assertTrue(got[pos:] == untouched * (len(data) - pos), "bytes after the last range were written")
