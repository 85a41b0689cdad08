#!/usr/bin/python3
"""MQTT-based file delivery (protocol.md §3): stream store, request decoding,
block selection, and the exact response encodings.

Owns: streams (id -> version, description, {file id -> bytes}) and the rules
of GetStream/DescribeStream. Never touches the network; faults and pacing are
applied by the caller (awsiot.py) to the blocks this module selects.
"""

import base64
import json
import re
import threading
from collections import namedtuple

import cbor2

MIN_BLOCK = 256
MAX_BLOCK = 131072
MAX_DATA_PER_REQUEST = 131072      # "at most 128 KB per request"
MAX_BITMAP = 12288                 # bitmap must be < 12288 bytes
MAX_OFFSET_OR_COUNT = 98304
MAX_FILE = 24 * 1024 * 1024        # 98304 blocks of 256 B (§3.7)
MAX_CLIENT_TOKEN = 64
STREAM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

# One data message: file id, absolute block index, declared size, payload.
Block = namedtuple("Block", "f i l p")


class StreamError(Exception):
    """A request answered on …/rejected/<fmt> (§3.6)."""

    def __init__(self, code, message, token=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.token = token


class Stream:
    def __init__(self, stream_id, files, description, version):
        self.id = stream_id
        self.files = files
        self.description = description
        self.version = version


class StreamStore:
    """Streams are account-wide in AWS; any thing allowed by policy may read."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams = {}

    def create(self, stream_id, files, description=""):
        """files: {file id (0..255): bytes}. Re-creating a stream bumps its
        version, as UpdateStream does."""
        if not STREAM_ID_RE.match(stream_id):
            raise ValueError("invalid stream id %r" % stream_id)
        for fid, data in files.items():
            if not isinstance(fid, int) or not 0 <= fid <= 255:
                raise ValueError("stream file id %r not in 0..255" % fid)
            if len(data) > MAX_FILE:
                raise ValueError("stream file %d is %d bytes, AWS allows %d"
                                 % (fid, len(data), MAX_FILE))
        with self._lock:
            old = self._streams.get(stream_id)
            version = old.version + 1 if old else 1
            self._streams[stream_id] = Stream(stream_id, dict(files),
                                              description, version)

    def get(self, stream_id):
        with self._lock:
            return self._streams.get(stream_id)

    def delete(self, stream_id):
        with self._lock:
            self._streams.pop(stream_id, None)


# ---- decoding ---------------------------------------------------------------

def decode_request(fmt, payload):
    """Returns the request map; raises StreamError on malformed input.
    In CBOR, `b` must be a byte string: a text bitmap gets InvalidCbor (§8.5)."""
    if fmt == "cbor":
        try:
            req = cbor2.loads(payload)
        except Exception:
            raise StreamError("InvalidCbor", "Invalid CBOR message")
        bad = "InvalidCbor", "Invalid CBOR message"
        if not isinstance(req, dict) or ("b" in req and not isinstance(req["b"], bytes)):
            raise StreamError(*bad)
    else:
        try:
            req = json.loads(payload)
        except ValueError:
            raise StreamError("InvalidJson", "Invalid JSON message")
        bad = "InvalidJson", "Invalid JSON message"
        if not isinstance(req, dict):
            raise StreamError(*bad)
        if "b" in req:
            req["b"] = _json_bitmap(req["b"])
    token = req.get("c")
    if token is not None and (not isinstance(token, str)
                              or len(token.encode()) > MAX_CLIENT_TOKEN):
        # c is left out of the reply when the token itself was invalid (§3.6).
        req["c"] = None
        raise StreamError("InvalidRequest", "Invalid client token")
    for key in "sflon":
        v = req.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise StreamError(bad[0], bad[1], token)
    return req


def _json_bitmap(value):
    # [INF §3.4] the hex string is read in the same byte order as the CBOR
    # byte string (the doc's "0x130080" for blocks 20,21,24,43 at o=20).
    if not isinstance(value, str):
        raise StreamError("InvalidRequest", "b must be a hex string")
    text = value[2:] if value[:2].lower() == "0x" else value
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise StreamError("InvalidRequest", "b must be a hex string")


# ---- GetStream --------------------------------------------------------------

def select_blocks(stream, req):
    """The blocks one GetStream request is answered with (§3.2, §3.4)."""
    token = req.get("c")
    if "f" not in req or "l" not in req:
        raise StreamError("InvalidRequest", "f and l are required", token)
    size = req["l"]
    if not MIN_BLOCK <= size <= MAX_BLOCK:
        raise StreamError("BlockSizeOutOfBounds",
                          "Block size %d is out of bounds" % size, token)
    if stream is None:
        raise StreamError("ResourceNotFound", "Stream not found", token)
    data = stream.files.get(req["f"])
    if data is None:
        raise StreamError("ResourceNotFound", "File %d not found" % req["f"], token)
    if req.get("s") is not None and req["s"] != stream.version:
        raise StreamError("VersionMismatch", "Stream version mismatch", token)
    bitmap = req.get("b")
    if bitmap is not None and len(bitmap) >= MAX_BITMAP:
        raise StreamError("BlockBitmapLimitExceeded",
                          "Bitmap is %d bytes" % len(bitmap), token)
    offset = req.get("o", 0)
    nblocks = (len(data) + size - 1) // size
    if offset > MAX_OFFSET_OR_COUNT or offset >= nblocks:
        raise StreamError("OffsetOutOfBounds", "Offset %d is out of bounds" % offset, token)
    count = req.get("n")
    if count is not None and count > MAX_OFFSET_OR_COUNT:
        raise StreamError("BlockCountLimitExceeded", "Too many blocks requested", token)
    cap = count or MAX_DATA_PER_REQUEST // size

    if bitmap is not None:
        # LSB-first within each byte, byte 0 first, bit 0 = block `o` (§3.4).
        wanted = [offset + k for k in range(len(bitmap) * 8)
                  if bitmap[k >> 3] & (1 << (k & 7))]
        if wanted and wanted[-1] >= nblocks:
            raise StreamError("InvalidRequest", "The data requested is out of "
                              "the range of data available.", token)
    else:
        wanted = range(offset, min(offset + cap, nblocks))

    blocks, total = [], 0
    for i in wanted[:cap]:
        p = data[i * size:(i + 1) * size]
        if total + len(p) > MAX_DATA_PER_REQUEST:
            break       # the rest needs a new request (§3.2)
        blocks.append(Block(req["f"], i, len(p), p))
        total += len(p)
    return blocks


# ---- encoding ---------------------------------------------------------------

def _indefinite_map(pairs):
    """The service encodes its maps with indefinite length, 0xBF … 0xFF (§3.3)."""
    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in pairs) + b"\xff"


def encode_block(fmt, token, block):
    pairs = ([("c", token)] if token is not None else []) + [
        ("f", block.f), ("i", block.i), ("l", block.l), ("p", block.p)]
    if fmt == "cbor":
        return _indefinite_map(pairs)
    return json.dumps({k: (base64.b64encode(v).decode() if k == "p" else v)
                       for k, v in pairs}, separators=(",", ":")).encode()


def encode_rejected(fmt, error):
    """Both spellings, as the service sends for backward compatibility (§3.6)."""
    pairs = []
    if error.token is not None:
        pairs += [("clientToken", error.token), ("c", error.token)]
    pairs += [("code", error.code), ("o", error.code),
              ("message", error.message), ("m", error.message)]
    if fmt == "cbor":
        return _indefinite_map(pairs)
    return json.dumps(dict(pairs), separators=(",", ":")).encode()


def encode_description(fmt, token, stream):
    """DescribeStream response: c, s, d, r = [{f, z}] (§3.5)."""
    pairs = ([("c", token)] if token is not None else []) + [
        ("s", stream.version), ("d", stream.description),
        ("r", [{"f": f, "z": len(d)} for f, d in sorted(stream.files.items())])]
    if fmt == "cbor":
        return _indefinite_map(pairs)
    return json.dumps(dict(pairs), separators=(",", ":")).encode()
