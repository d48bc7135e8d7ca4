"""NetnsCluster: real etcd members, each on a host of its own, for the tests where the network is the point.

On loopback (LocalCluster) a member can only be killed or frozen (SIGSTOP). A real network
also partitions, cuts a member off from its peers while clients still reach it, cuts it off
from the bot only, or slows one link down. Here each host is a network namespace with
addresses of its own: a client link on the bed's client bridge and a peer link on its peer
bridge (veth pairs), so client and peer traffic fail separately. Members listen and advertise
on etcd's production ports, client URLs on the client link, peer URLs on the peer link. The
root namespace, where the bot and the tests run (`BOT`), has an address on the client bridge
only. The subnets are picked at start among the private ones no route or address of the
machine overlaps.

Faults live in the neighbour tables. Every host knows every other host's MAC address as a
permanent entry, so no ARP is ever sent and a cut is silent, as a black-holed host is (a failed
ARP would turn it into a quick "no route to host"). Cutting A from B on a link points A's entry
for B, and B's for A, at a MAC address nobody has: the bridge floods those frames and every
port drops them. Latency and loss point A's entries at a wire (`bot.testing.wire`), since
the kernel's netem cannot be counted on.

Everything a bed makes is named with its prefix (`eb` and 4 hex digits): namespaces
`<prefix>-<host>`, bridges, veth ends and TAPs `<prefix>...` (at most 15 characters). A reaper
process removes all of it, and the processes inside, when the bed's owner dies without closing
it; `CREATED` lists the prefixes this process used, so the test suite can check nothing is left.
"""
from __future__ import annotations

import argparse
import enum
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from bot.testing.cluster import START_TIMEOUT, ClusterError, LocalCluster, log_tail

CREATED: list[str] = []  # name prefixes of the beds this process made
CLIENT_PORT, PEER_PORT = 2379, 2380
MAX_HOSTS = 32           # host i has address .i+1 (.1 is the bot's); TLS certificates name them all
BOT = "bot"              # the root namespace as a host on the client link: the bot and the tests


class BedUnavailable(ClusterError):
    """The bed cannot run on this machine (not root, no iproute2); the message says why, in one line."""


class Link(enum.Enum):
    CLIENT = "client"
    PEER = "peer"

    @property
    def code(self) -> int:
        return 1 if self is Link.CLIENT else 2


@dataclass(frozen=True)
class Host:
    """One host of the bed: a network namespace and its addresses (no peer link for a host that is
    only a client, e.g. a bot replica or PostgreSQL). Recorded under `<base_dir>/hosts/`, where the
    `command` launcher's helper finds the host of a new member by its peer URL."""

    name: str
    netns: str
    index: int
    client_ip: str
    peer_ip: str | None = None

    def ip(self, link: Link) -> str | None:
        return self.client_ip if link is Link.CLIENT else self.peer_ip

    def url(self, link: Link, scheme: str = "http") -> str:
        port = CLIENT_PORT if link is Link.CLIENT else PEER_PORT
        return f"{scheme}://{self.ip(link)}:{port}"


def host_for_url(base_dir: Path, url: str) -> Host | None:
    """The recorded host whose client or peer address `url` names, if any."""
    address = url.split("://", 1)[-1].rsplit(":", 1)[0]
    for path in sorted((base_dir / "hosts").glob("*.json")):
        host = Host(**json.loads(path.read_text()))
        if address in (host.client_ip, host.peer_ip):
            return host
    return None


# ---------------------------------------------------------------- iproute2

def ip(*args: str, netns: str | None = None, batch: Sequence[str] = (), check: bool = True) -> str:
    """Run iproute2's `ip` (in `netns`); `batch` lines go through one `ip -batch -` process."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-batch", "-"] if batch else args)]
    proc = subprocess.run(argv, input="".join(f"{line}\n" for line in batch) if batch else None,
                          capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        what = " ".join(args) if args else f"-batch ({batch[0]} ...)"
        raise ClusterError(f"ip {what}{f' in {netns}' if netns else ''} failed: {proc.stderr.strip()}")
    return proc.stdout


def unavailable() -> str | None:
    """Why no bed can run on this machine, in one line, or None when one can."""
    if os.geteuid() != 0:
        return "the multi-host bed needs root (network namespaces, veth, bridges): run the tests as root"
    if shutil.which("ip") is None or shutil.which("bridge") is None:
        return "the multi-host bed needs iproute2 (`ip` and `bridge` on PATH)"
    return None


def _netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line.strip()]


def _link_names() -> list[str]:
    return [link["ifname"] for link in json.loads(ip("-j", "link", "show", check=False) or "[]")]


def leftovers(prefixes: Iterable[str]) -> list[str]:
    """Namespaces and links still present that carry one of `prefixes`."""
    prefixes = tuple(prefixes)
    if not prefixes or shutil.which("ip") is None:
        return []
    return ([f"namespace {n}" for n in _netns_names() if n.startswith(tuple(p + "-" for p in prefixes))]
            + [f"link {n}" for n in _link_names() if n.startswith(prefixes)])


def teardown(prefix: str) -> None:
    """Remove all a bed made: the processes in its namespaces (killed), its links, its namespaces.
    Idempotent, so close() and the reaper may both run it."""
    namespaces = [n for n in _netns_names() if n.startswith(prefix + "-")]
    pids = [int(p) for ns in namespaces for p in ip("netns", "pids", ns, check=False).split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5.0
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    for link in _link_names():
        if link.startswith(prefix):  # a veth end takes its peer in the namespace with it
            ip("link", "del", link, check=False)
    for ns in namespaces:
        ip("netns", "del", ns, check=False)


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no namespace)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network a route (any table) or an address of the machine covers."""
    nets = [ipaddress.ip_network(r["dst"], strict=False)
            for r in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]")
            if r.get("dst") not in (None, "default")]
    nets += [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
             for link in json.loads(ip("-j", "-4", "addr", "show") or "[]") for a in link.get("addr_info", [])]
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


PRIVATE = [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]


def _pick_subnets(rng: random.Random) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """A free private /23, split into the client /24 and the peer /24."""
    taken = _taken_networks()
    for block in PRIVATE:
        for _ in range(100):
            start = int(block.network_address) + rng.randrange(block.num_addresses // 512) * 512
            pair = ipaddress.IPv4Network((start, 23))
            if not any(pair.overlaps(t) for t in taken):
                client, peer = pair.subnets(prefixlen_diff=1)
                return client, peer
    raise BedUnavailable("no free private /23 for the bed: every one overlaps a route or address of this machine")


# ---------------------------------------------------------------- the network

@dataclass
class _Wire:
    tap: str
    proc: subprocess.Popen[bytes]
    stdin: IO[bytes]


@dataclass
class Network:
    """The bed's network: two bridges, hosts on them, and the faults between hosts."""

    base_dir: Path
    prefix: str = field(default="", init=False)  # set by start()
    client_net: ipaddress.IPv4Network | None = field(default=None, init=False)
    peer_net: ipaddress.IPv4Network | None = field(default=None, init=False)
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    _blocked: set[tuple[frozenset[str], Link]] = field(default_factory=set, init=False)
    _wires: dict[tuple[str, Link], _Wire] = field(default_factory=dict, init=False)
    _programs: list[subprocess.Popen[Any]] = field(default_factory=list, init=False)
    _reaper: subprocess.Popen[bytes] | None = field(default=None, init=False)

    # -- lifecycle ------------------------------------------------------

    def start(self, *, keep_dir: bool = False) -> Network:
        """Make the bridges on free subnets, with a reaper watching this process.
        Raises BedUnavailable when not root or without iproute2's `ip`."""
        if reason := unavailable():
            raise BedUnavailable(reason)
        rng = random.SystemRandom()
        names = set(_link_names()) | set(_netns_names())
        self.prefix = next(p for p in (f"eb{rng.randrange(16 ** 4):04x}" for _ in range(100))
                           if not any(n.startswith(p) for n in names))
        CREATED.append(self.prefix)
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "bot.testing.netbed", "--reap", self.prefix,
             *([] if keep_dir else ["--remove", str(self.base_dir)])],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for link in Link:
            ip(batch=[f"link add {self._bridge(link)} type bridge",
                      f"link set {self._bridge(link)} address {self._mac(link, 0, 0)}",
                      f"link set {self._bridge(link)} up"])
        for _ in range(10):
            self.client_net, self.peer_net = _pick_subnets(rng)
            ip("addr", "add", f"{self.bot_ip}/24", "dev", self._bridge(Link.CLIENT))
            rivals = [t for t in _taken_networks() if t.overlaps(self.client_net) and t != self.client_net
                      and t.prefixlen != 32]
            if not rivals and self._routes_to_client_net() == 1:
                return self
            ip("addr", "del", f"{self.bot_ip}/24", "dev", self._bridge(Link.CLIENT), check=False)  # lost a race
        raise BedUnavailable("could not claim a free subnet for the bed's client bridge in 10 tries")

    def close(self) -> None:
        """Remove every namespace, link and wire of the bed and stop what runs in it (idempotent)."""
        if not self.prefix:
            return
        for key in list(self._wires):
            self._stop_wire(key)
        teardown(self.prefix)
        for proc in self._programs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._programs.clear()
        if self._reaper is not None and self._reaper.stdin is not None:
            self._reaper.stdin.write(b"closed\n")
            self._reaper.stdin.close()
            try:
                self._reaper.wait(15)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    # -- hosts ----------------------------------------------------------

    @property
    def bot_ip(self) -> str:
        """The root namespace's address on the client link: where the hosts reach the bot and the tests."""
        assert self.client_net is not None, "start() the network first"
        return str(self.client_net.network_address + 1)

    def add_host(self, name: str, *, peer: bool = True) -> Host:
        """A new host with a client link, and a peer link unless `peer` is False (a host that is only
        a client: a bot replica, PostgreSQL). Adding a name again returns the host it already has."""
        if name in self.hosts:
            return self.hosts[name]
        if name == BOT or not name.replace("-", "").isalnum():
            raise ClusterError(f"not a usable host name: {name!r}")
        assert self.client_net is not None and self.peer_net is not None, "start() the network first"
        index = len(self.hosts) + 1
        if index > MAX_HOSTS:
            raise ClusterError(f"the bed holds at most {MAX_HOSTS} hosts")
        host = Host(name=name, netns=f"{self.prefix}-{name}", index=index,
                    client_ip=str(self.client_net.network_address + index + 1),
                    peer_ip=str(self.peer_net.network_address + index + 1) if peer else None)
        ip("netns", "add", host.netns)
        links = [link for link in Link if host.ip(link)]
        ip(batch=[line for link in links for line in (
            f"link add {self._veth(host, link)} type veth peer name {link.value} netns {host.netns}",
            f"link set {self._veth(host, link)} master {self._bridge(link)} up")])
        ip(netns=host.netns, batch=["link set lo up"] + [line for link in links for line in (
            f"link set {link.value} address {self._mac(link, 0, index)}",
            f"addr add {host.ip(link)}/24 dev {link.value}",
            f"link set {link.value} up")])
        self.hosts[name] = host
        records = self.base_dir / "hosts"
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{name}.json").write_text(json.dumps(asdict(host)))
        for (_, link), wire in self._wires.items():  # a slow host's wire must reach the new host too
            if address := host.ip(link):
                wire.stdin.write(f"{address}={self._mac(link, 0, index)}\n".encode())
                wire.stdin.flush()
        self._sync([*self.hosts, BOT])
        return host

    def addresses(self, link: Link) -> dict[str, tuple[str, str]]:
        """Every endpoint on `link` (the bot too, on the client link): name -> (address, MAC)."""
        out = {name: (ip_, self._mac(link, 0, h.index)) for name, h in self.hosts.items() if (ip_ := h.ip(link))}
        if link is Link.CLIENT:
            out[BOT] = (self.bot_ip, self._mac(link, 0, 0))
        return out

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program on `host` (killed when the bed closes, like everything in its namespace)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *argv],
                                                       **kwargs)
        self._programs.append(proc)
        return proc

    # -- faults ---------------------------------------------------------

    def block(self, a: str, b: str, link: Link) -> None:
        """No frame passes between hosts `a` and `b` on `link`, either way, and neither side is told."""
        self._blocked.add((frozenset((a, b)), link))
        self._sync([a, b])

    def impair(self, host: str, link: Link, *, delay: float = 0.0, loss: float = 0.0) -> None:
        """Hold each frame `host` sends on `link` for `delay` seconds and drop a `loss` share of them."""
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            raise BedUnavailable("the bed's slow links need /dev/net/tun (TUN/TAP) and cannot run here")
        h = self.hosts[host]
        if not h.ip(link):
            raise ClusterError(f"{host} has no {link.value} link")
        self._stop_wire((host, link))
        tap, mac = f"{self.prefix}w{h.index}{link.value[0]}", self._mac(link, 1, h.index)
        routes = [f"{ip}={mac_}" for ip, mac_ in self.addresses(link).values()]
        log = self.base_dir / "logs" / f"wire-{host}-{link.value}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            proc = subprocess.Popen([sys.executable, "-m", "bot.testing.wire", "--tap", tap, "--mac", mac,
                                     "--delay", repr(delay), "--loss", repr(loss), "--bed", str(self.base_dir),
                                     *routes], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        self._wires[(host, link)] = _Wire(tap, proc, proc.stdin)
        if proc.stdout.readline().strip() != b"ready":
            self._stop_wire((host, link))
            raise ClusterError(f"the wire for {host}'s {link.value} link did not start:\n{log_tail(log)}")
        ip(batch=[f"link set {tap} master {self._bridge(link)}",
                  f"link set {tap} type bridge_slave learning off flood off mcast_flood off bcast_flood off",
                  f"link set {tap} up"])
        subprocess.run(["bridge", "fdb", "add", mac, "dev", tap, "master", "static"], check=True,
                       capture_output=True, timeout=30)
        self._sync([host])

    def heal(self, host: str | None = None) -> None:
        """Undo every block and impairment involving `host` (all of them when None)."""
        blocked = {b for b in self._blocked if host is None or host in b[0]}
        wires = {key: self._wires.pop(key) for key in list(self._wires) if host is None or key[0] == host}
        self._blocked -= blocked
        self._sync({name for pair, _ in blocked for name in pair} | {name for name, _ in wires})
        for wire in wires.values():  # once no entry points at it
            _end_wire(wire)

    # -- internals ------------------------------------------------------

    def _bridge(self, link: Link) -> str:
        return f"{self.prefix}{link.value[0]}"

    def _veth(self, host: Host, link: Link) -> str:
        return f"{self.prefix}{link.value[0]}{host.index}"

    def _mac(self, link: Link, kind: int, index: int) -> str:
        """Locally administered: the bed's id, the link, kind (0 a host, 1 a wire, 255 nobody), the host."""
        bed = self.prefix[2:]
        return f"02:{bed[:2]}:{bed[2:]}:{link.code:02x}:{kind:02x}:{index:02x}"

    def _next_hop(self, viewer: str, target: str, link: Link) -> str:
        """The MAC address `viewer` sends `target`'s frames to on `link`: nobody's when the pair is
        blocked, the viewer's wire when its link is slow, else the target's own."""
        if (frozenset((viewer, target)), link) in self._blocked:
            return self._mac(link, 255, 0)
        if viewer != BOT and (viewer, link) in self._wires:
            return self._mac(link, 1, self.hosts[viewer].index)
        return self.addresses(link)[target][1]

    def _sync(self, viewers: Iterable[str]) -> None:
        """Write each viewer's permanent neighbour entries from the blocks and wires in force."""
        for viewer in dict.fromkeys(viewers):
            lines = []
            for link in Link:
                endpoints = self.addresses(link)
                if viewer not in endpoints:
                    continue
                dev = self._bridge(link) if viewer == BOT else link.value
                lines += [f"neigh replace {address} lladdr {self._next_hop(viewer, target, link)} dev {dev} "
                          "nud permanent" for target, (address, _) in endpoints.items() if target != viewer]
            if lines:
                ip(netns=None if viewer == BOT else self.hosts[viewer].netns, batch=lines)

    def _routes_to_client_net(self) -> int:
        routes = json.loads(ip("-j", "-4", "route", "show", "table", "main") or "[]")
        return sum(1 for r in routes if r.get("dst") == str(self.client_net))

    def _stop_wire(self, key: tuple[str, Link]) -> None:
        if (wire := self._wires.pop(key, None)) is not None:
            _end_wire(wire)


def _end_wire(wire: _Wire) -> None:
    wire.stdin.close()  # the wire exits when its stdin closes
    try:
        wire.proc.wait(5)
    except subprocess.TimeoutExpired:
        wire.proc.kill()
        wire.proc.wait()
    if wire.proc.stdout is not None:
        wire.proc.stdout.close()
    ip("link", "del", wire.tap, check=False)  # gone with the process already, unless it hung


# ---------------------------------------------------------------- the cluster

class NetnsCluster(LocalCluster):
    """LocalCluster's interface (start/close, members and their records, kill, pause/resume, restart,
    add_member, etcdctl, ...), with each member on a host of its own and the network's faults:
    `isolate`, `cut_from_peers`, `cut_from_bot`, `impair`, `heal`. Spare hosts (`add_host`) take a
    replacement member, a bot replica or PostgreSQL. Needs root; raises BedUnavailable otherwise."""

    def __init__(self, size: int = 3, *, tls: bool = False, base_dir: str | Path | None = None,
                 prefix: str = "member", keep: bool = False, extra_args: Sequence[str] = (),
                 cert_days: float = 365.0) -> None:
        # TLS certificates name the hosts' addresses, which exist only once the network has started.
        super().__init__(size, tls=False, base_dir=base_dir, prefix=prefix, keep=keep, extra_args=extra_args)
        self._cert_days = cert_days if tls else None
        self.net = Network(self.base_dir)

    def start(self, timeout: float = START_TIMEOUT) -> NetnsCluster:
        self.net.start(keep_dir=self.keep)
        if self._cert_days is not None:
            assert self.net.client_net is not None and self.net.peer_net is not None
            addresses = [str(net.network_address + i) for net in (self.net.client_net, self.net.peer_net)
                         for i in range(1, MAX_HOSTS + 2)]
            self.tls = self._make_tls(self._cert_days, ("127.0.0.1", "localhost", *addresses))
            self.scheme = "https"
        super().start(timeout)
        return self

    def close(self) -> None:
        try:
            self._kill_all()
        finally:
            self.net.close()
            super().close()

    # -- hosts ----------------------------------------------------------

    def add_host(self, name: str, *, peer: bool = True) -> Host:
        """A spare host, e.g. for the member a replacement starts (its URLs: `host.url(Link.PEER, c.scheme)`)."""
        return self.net.add_host(name, peer=peer)

    def host(self, name: str) -> Host:
        try:
            return self.net.hosts[name]
        except KeyError:
            raise ClusterError(f"no host named {name!r} on the bed") from None

    # -- faults ---------------------------------------------------------

    def isolate(self, name: str) -> None:
        """Cut the host off entirely: nothing reaches it or leaves it, on either link."""
        for link in Link:
            for other in self.net.addresses(link):
                if other != name:
                    self.net.block(name, other, link)

    def cut_from_peers(self, name: str) -> None:
        """Cut the host's peer link: clients (the bot) still reach it, its peers do not, so it
        loses its leader after the election timeout."""
        for other in self.net.addresses(Link.PEER):
            if other != name:
                self.net.block(name, other, Link.PEER)

    def cut_from_bot(self, name: str) -> None:
        """The bot (the root namespace) no longer reaches the host; its peers and other clients still do."""
        self.net.block(name, BOT, Link.CLIENT)

    def impair(self, name: str, link: Link = Link.PEER, *, delay: float = 0.0, loss: float = 0.0) -> None:
        """What the host sends on `link` arrives `delay` seconds late, and a `loss` share never arrives."""
        self.net.impair(name, link, delay=delay, loss=loss)

    def heal(self, name: str | None = None) -> None:
        """Undo the faults involving the host (every fault when None)."""
        self.net.heal(name)

    # -- LocalCluster's hooks ---------------------------------------------

    def _initial_urls(self, names: list[str]) -> dict[str, tuple[str, str]]:
        return {n: self._urls_for(n) for n in names}

    def _urls_for(self, name: str, client_port: int | None = None,
                  peer_port: int | None = None) -> tuple[str, str]:
        host = self.net.add_host(name)
        if host.peer_ip is None:
            raise ClusterError(f"host {name} has no peer link: it cannot run a member")
        return (f"{self.scheme}://{host.client_ip}:{client_port or CLIENT_PORT}",
                f"{self.scheme}://{host.peer_ip}:{peer_port or PEER_PORT}")

    def _netns(self, name: str) -> str | None:
        host = self.net.hosts.get(name)
        return host.netns if host else None


# ---------------------------------------------------------------- the reaper

def _reap(prefix: str, remove: str | None) -> int:
    """Wait for the owner: when its pipe closes without "closed" (it died), remove the bed."""
    received = b""
    while chunk := os.read(0, 4096):
        received += chunk
    if b"closed" not in received:
        teardown(prefix)
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="netbed", description="the multi-host bed's reaper")
    parser.add_argument("--reap", required=True, help="the bed's name prefix")
    parser.add_argument("--remove", default=None, help="the bed's directory, removed with it")
    arguments = parser.parse_args()
    raise SystemExit(_reap(arguments.reap, arguments.remove))
