#!/usr/bin/python3
"""Fault knobs for stream delivery and the AWS per-connection caps.

Owns: what to do to the blocks of one GetStream answer (drop, duplicate,
reorder, corrupt) with a seeded RNG so a failing run can be replayed, and
the pacing that emulates AWS IoT's per-connection limits (protocol.md §7).
"""

import random
import threading
import time

AWS_BYTES_PER_S = 512 * 1024      # "512 KiB/s per connection (excess delayed)"
AWS_PUBLISHES_PER_S = 100         # "100 publish requests/s per connection (in+out)"


class Faults:
    """Probabilities are per block, 0..1. delay is seconds added before every
    response. drop_once: block indices dropped the first time only."""

    KNOBS = ("drop", "duplicate", "reorder", "corrupt_size", "bad_index",
             "wrong_file", "delay", "drop_once", "seed")

    def __init__(self, drop=0.0, duplicate=0.0, reorder=0.0, corrupt_size=0.0,
                 bad_index=0.0, wrong_file=0.0, delay=0.0, drop_once=(), seed=1):
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.corrupt_size = corrupt_size
        self.bad_index = bad_index
        self.wrong_file = wrong_file
        self.delay = delay
        self.drop_once = set(drop_once)
        self.rng = random.Random(seed)
        self._lock = threading.Lock()

    def apply(self, blocks, nblocks):
        """Returns the blocks to send, in sending order."""
        with self._lock:
            rng = self.rng
            out = []
            for b in blocks:
                if b.i in self.drop_once:
                    self.drop_once.discard(b.i)
                    continue
                if rng.random() < self.drop:
                    continue
                if rng.random() < self.corrupt_size:
                    b = b._replace(l=b.l + 1)          # l != len(p)
                if rng.random() < self.bad_index:
                    b = b._replace(i=nblocks + b.i)    # beyond the file
                if rng.random() < self.wrong_file:
                    b = b._replace(f=(b.f + 1) % 256)
                out.append(b)
                if rng.random() < self.duplicate:
                    out.append(b)
            i = 0
            while i < len(out) - 1:
                if rng.random() < self.reorder:
                    out[i], out[i + 1] = out[i + 1], out[i]
                    i += 2
                else:
                    i += 1
            return out


class Pacer:
    """Leaky buckets for one device connection. Every message in either
    direction is accounted; outgoing ones wait for their slot, so excess
    traffic is delayed (queued), never dropped."""

    def __init__(self, bytes_per_s=AWS_BYTES_PER_S, publishes_per_s=AWS_PUBLISHES_PER_S):
        self.bytes_per_s = bytes_per_s
        self.publishes_per_s = publishes_per_s
        self._lock = threading.Lock()
        self._byte_clock = 0.0
        self._msg_clock = 0.0

    def reserve(self, nbytes):
        """Accounts one message; returns the monotonic time it may go."""
        now = time.monotonic()
        with self._lock:
            t_bytes = max(now, self._byte_clock)
            self._byte_clock = t_bytes + nbytes / self.bytes_per_s
            t_msgs = max(now, self._msg_clock)
            self._msg_clock = t_msgs + 1.0 / self.publishes_per_s
            return max(t_bytes, t_msgs)
