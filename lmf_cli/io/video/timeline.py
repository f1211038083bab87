"""The input's timestamps made continuous across a .ts's discontinuities: planning, decoding and the
mux each read the input, and all of them must see the same timeline or its streams fall out of step.
"""

from __future__ import annotations

from fractions import Fraction

import av

JUMP_BACK, JUMP_AHEAD = Fraction(1, 10), 10  # seconds: a stream stepping back or ahead this far has a discontinuity


class Mender:
    """One stream's timestamps, made continuous across the discontinuities of a .ts (files joined with
    `cat`, a broadcast's splice, a counter reset) in the order the packets come: left alone, the
    video's would go back or leap hours, which the mux refuses or plays as a frozen gap. At its
    k-th jump a stream takes the offset the video took at its k-th (so streams stay in step); a
    stream without a match, or one that would still step back, goes on from where it ended.

    `jumps` None: learn them (the planning scan of the video stream); () does nothing."""

    def __init__(self, jumps: tuple[Fraction, ...] | None, time_base: Fraction, step: int = 1) -> None:
        self.learning = jumps is None
        self.offsets = [] if jumps is None else [round(j / time_base) for j in jumps]
        self.active = self.learning or bool(self.offsets)
        self.back, self.ahead = JUMP_BACK / time_base, JUMP_AHEAD / time_base
        self.time_base, self.step = time_base, step
        self.jumps: list[Fraction] = []  # learnt: the offsets, in seconds
        self.at: list[int] = []  # learnt: where each jump is (mended ticks)
        self.k = self.offset = 0
        self.last: int | None = None  # the previous packet's timestamp as read
        self.prev = self.end = None  # ... and mended, and where it ended

    def __call__(self, packet: av.Packet) -> None:
        if not self.active:
            return
        ts = packet.dts if packet.dts is not None else packet.pts
        if ts is not None:
            if self.last is not None and not -self.back <= ts - self.last <= self.ahead and self.end is not None:
                if not self.learning and self.k < len(self.offsets):
                    self.offset = max(self.offsets[self.k], self.end - ts)  # never over the stream's own end
                else:
                    self.offset = self.end - ts
                if self.learning:
                    self.jumps.append(self.offset * self.time_base)
                    self.at.append((packet.pts if packet.pts is not None else ts) + self.offset)
                self.k += 1
            elif packet.dts is not None and self.prev is not None and ts + self.offset < self.prev:  # within a part
                self.offset = self.end - ts
            self.last = ts
            self.prev = ts + self.offset
            self.end = self.prev + (packet.duration or self.step)
        if self.offset:
            packet.pts = None if packet.pts is None else packet.pts + self.offset
            packet.dts = None if packet.dts is None else packet.dts + self.offset
