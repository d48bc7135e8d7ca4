"""A slow, lossy wire in user space, for the multi-host bed (`bot.testing.netbed`).

The bed cannot count on the kernel for latency: `tc qdisc ... netem` needs sch_netem,
which kernels built without it (this machine's among them) refuse with "Specified
qdisc kind is unknown". So a wire is a TAP port on one of the bed's bridges, served by
this process. A host whose link should be slow sends its frames to the wire's MAC
address (the bed points the host's neighbour entries at it); the wire holds each frame
for the delay, drops a share of them, and writes the rest back onto the bridge addressed
to their real destination (found by destination IPv4 address). Only that host's
outgoing frames pass through it, as with netem on the host's own interface.

    python -m bot.testing.wire --tap NAME --mac MAC --delay SECONDS [--loss FRACTION] --bed DIR IP=MAC...

It prints "ready" once the TAP exists. More IP=MAC lines on stdin add destinations
(hosts added later); when stdin closes (the bed closed it, or the bed's process died)
it exits, and the TAP goes with it.
"""
from __future__ import annotations

import argparse
import collections
import fcntl
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETHERTYPE_IPV4 = b"\x08\x00"


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def ip_bytes(ip: str) -> bytes:
    return bytes(int(part) for part in ip.split("."))


def parse_route(text: str) -> tuple[bytes, bytes]:
    ip, mac = text.strip().split("=", 1)
    return ip_bytes(ip), mac_bytes(mac)


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wire", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--tap", required=True, help="the TAP device to create")
    p.add_argument("--mac", required=True, help="the wire's MAC address: frames sent to it are carried")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each frame is held")
    p.add_argument("--loss", type=float, default=0.0, help="the share of frames dropped (0 to 1)")
    p.add_argument("--bed", required=True, help="the bed's directory (names the process as the bed's)")
    p.add_argument("routes", nargs="*", help="IP=MAC: where a frame for IP goes")
    args = p.parse_args(argv)
    routes = dict(parse_route(r) for r in args.routes)
    mine = mac_bytes(args.mac)
    fd = open_tap(args.tap)
    print("ready", flush=True)
    held: collections.deque[tuple[float, bytes]] = collections.deque()  # one delay for all: FIFO is the order
    stdin, pending = sys.stdin.fileno(), b""
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else None
        readable, _, _ = select.select([fd, stdin], [], [], wait)
        if stdin in readable:
            data = os.read(stdin, 4096)
            if not data:
                return 0
            *lines, pending = (pending + data).split(b"\n")
            routes.update(parse_route(line.decode()) for line in lines if line.strip())
        if fd in readable:
            frame = os.read(fd, 65536)
            # An IPv4 frame addressed to the wire: its destination address is at bytes 30-33.
            if frame[:6] == mine and frame[12:14] == ETHERTYPE_IPV4 and (dst := routes.get(frame[30:34])):
                if random.random() >= args.loss:
                    held.append((time.monotonic() + args.delay, dst + frame[6:]))
        now = time.monotonic()
        while held and held[0][0] <= now:
            os.write(fd, held.popleft()[1])


if __name__ == "__main__":
    raise SystemExit(main())
