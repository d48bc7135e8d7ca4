"""`etcd-chatops demo`: the runbook played as an incident channel lives it.

A local 3-member etcd cluster, the Slack stand-in and the bot run as real
processes on 127.0.0.1; the demo talks to them only as people in the channel
do (through the stand-in's control API) and prints the channel. Everything
is removed at the end, also on Ctrl-C or an error, unless --keep.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from bot.domain.errors import EtcdError
from bot.etcd.client import EtcdClient
from bot.testing.cluster import QUOTA_ARGS, LocalCluster, fill_until_nospace, free_port, log_tail
from bot.testing.sshbed import SshControlPlane, sshd_missing
from bot.testing.transcript import Style, render_message
from bot.testing.workspace import (
    CHANNEL,
    CHANNELS,
    LEAD,
    LEAD2,
    LEADS_GROUP,
    ONCALL,
    STRANGER,
    USERGROUPS,
    USERS,
    BotProcess,
    SlackSecrets,
    cluster_table,
    write_config,
)

STATE_FILE = "demo.json"
PEOPLE = {"alice": ONCALL, "bob": LEAD, "carol": LEAD2, "mallory": STRANGER}
NAMES = {uid: info["name"] for uid, info in USERS.items()} | {"U0BOT00001": "etcd-chatops", LEADS_GROUP: "oncall-leads"}
PLAN_TIMEOUT = 120.0


class DemoError(Exception):
    pass


def default_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"etcd-chatops-demo-{os.getuid()}"


@dataclass
class DemoState:
    """What `say` and `demo --stop` need to find a kept demo (no secrets)."""

    directory: str
    standin_url: str
    standin_pid: int
    bot_url: str
    bot_pid: int
    cluster_dir: str

    def save(self) -> None:
        Path(self.directory, STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> DemoState:
        path = directory / STATE_FILE
        if not path.is_file():
            raise DemoError(f"no demo is running in {directory} (start one with: etcd-chatops demo --keep)")
        return cls(**json.loads(path.read_text()))


class Spinner:
    """A progress line on a terminal; one plain line otherwise."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO, style: Style):
        self.out, self.style = out, style
        self.task: asyncio.Task | None = None

    @asynccontextmanager
    async def running(self, what: str) -> AsyncIterator[None]:
        if not self.style.colour:
            print(f"… {what}", file=self.out, flush=True)
            yield
            return

        async def spin() -> None:
            started = time.monotonic()
            for i in range(10**9):
                self.out.write(f"\r{self.FRAMES[i % len(self.FRAMES)]} {what} ({time.monotonic() - started:.0f}s)")
                self.out.flush()
                await asyncio.sleep(0.1)

        task = asyncio.get_running_loop().create_task(spin())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.out.write("\r\033[K")
            self.out.flush()


class ChannelClient:
    """Speak in the channel through the stand-in's control API, and read it."""

    def __init__(self, standin_url: str, out: TextIO, style: Style):
        self.url, self.out, self.style = standin_url.rstrip("/"), out, style
        self.session: aiohttp.ClientSession | None = None
        self.seen = 0

    async def __aenter__(self) -> ChannelClient:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    def print(self, msg: dict[str, Any]) -> None:
        print(render_message(msg, self.style, NAMES, CHANNELS) + "\n", file=self.out, flush=True)

    def echo(self, user: str, text: str) -> None:
        print(f"#{CHANNELS[CHANNEL]}  {self.style.bold(NAMES[user])}: {text}\n", file=self.out, flush=True)

    async def say(self, text: str, user: str = ONCALL, wait: float = 20.0) -> list[dict[str, Any]]:
        """Type `/etcd text` in the channel; print and return what it caused."""
        self.echo(user, f"/etcd {text}")
        async with self.session.post(f"{self.url}/_standin/command", json={
                "text": text, "user_id": user, "channel_id": CHANNEL, "wait": wait}) as r:
            body = await r.json()
        if r.status != 200 or body["delivery"]["status"] != 200:
            raise DemoError(f"the bot did not take /etcd {text}: {body}")
        return self._show(body["messages"], body["next_index"])

    async def react(self, user: str, ts: str, reaction: str, wait: float = 5.0) -> list[dict[str, Any]]:
        print(f"#{CHANNELS[CHANNEL]}  {self.style.bold(NAMES[user])} reacts :{reaction}: to the plan\n",
              file=self.out, flush=True)
        async with self.session.post(f"{self.url}/_standin/react", json={
                "user": user, "channel": CHANNEL, "ts": ts, "reaction": reaction, "wait": wait}) as r:
            body = await r.json()
        if r.status != 200:
            raise DemoError(f"the reaction was not delivered: {body}")
        return self._show(body["messages"], body["next_index"])

    async def plan_message(self, plan_id: str | None) -> dict[str, Any]:
        """The message of plan `plan_id`, or of the newest plan in the channel."""
        async with self.session.get(f"{self.url}/_standin/messages", params={"after": "0"}) as r:
            messages = await r.json()
        plans = [m for m in messages if m.get("source") == "chat.postMessage" and not m.get("thread_ts")
                 and (found := PLAN_ID.search(m.get("text") or "")) and plan_id in (None, found.group(1))]
        if not plans:
            raise DemoError(f"no plan {plan_id} in the channel" if plan_id else "no plan in the channel yet: "
                            "propose one first (say \"/etcd replace ...\")")
        return plans[-1]

    async def follow(self, until: re.Pattern, timeout: float) -> dict[str, Any]:
        """Print new messages until one matches `until`; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with self.session.get(f"{self.url}/_standin/messages", params={"after": str(self.seen)}) as r:
                new = await r.json()
            for msg in new:
                self.print(msg)
                self.seen = msg["index"] + 1
                if until.search(msg["text"] or ""):
                    return msg
            await asyncio.sleep(0.2)
        raise DemoError(f"nothing matching {until.pattern!r} within {timeout:g}s")

    def _show(self, messages: list[dict[str, Any]], next_index: int) -> list[dict[str, Any]]:
        for msg in messages:
            self.print(msg)
        self.seen = max(self.seen, next_index)
        return messages


# ---------------------------------------------------------------- the stack

SEED = [
    ("/registry/namespaces/default", {"kind": "Namespace", "metadata": {"name": "default"}}),
    ("/registry/namespaces/kube-system", {"kind": "Namespace", "metadata": {"name": "kube-system"}}),
    ("/registry/services/specs/default/kubernetes", {"kind": "Service", "spec": {"clusterIP": "10.96.0.1"}}),
    ("/registry/deployments/default/web", {"kind": "Deployment", "spec": {"replicas": 3}}),
    ("/registry/configmaps/kube-system/coredns",
     {"kind": "ConfigMap", "data": {"Corefile": ".:53 { forward . /etc/resolv.conf }"}}),
] + [(f"/registry/pods/default/web-{i}",
      {"kind": "Pod", "metadata": {"name": f"web-{i}"}, "status": {"phase": "Running"}})
     for i in range(1, 9)] + [
    ("/registry/secrets/kube-system/bootstrap-token-demo",
     {"kind": "Secret", "data": {"token": "demo-not-a-real-secret"}}),
]


class Stack:
    """The processes of one demo, and how to take them down."""

    def __init__(self, directory: Path, keep: bool, extra_args: tuple[str, ...] = (), watch: bool = False):
        self.dir = directory
        self.keep = keep
        self.extra_args = extra_args  # more etcd flags (the NOSPACE scenario's small quota)
        self.watch = watch            # the watch on, looking every second (the alerts scenario)
        self.creds = SlackSecrets()
        self.cluster: LocalCluster | None = None
        self.bed: SshControlPlane | None = None   # the kubeadm scenario's control plane (instead of `cluster`)
        self.standin: subprocess.Popen | None = None
        self.bot: BotProcess | None = None
        self.standin_url = ""

    def start_cluster(self) -> LocalCluster:
        self.cluster = LocalCluster(3, base_dir=self.dir / "cluster", keep=True, extra_args=self.extra_args)
        self.cluster.start()
        return self.cluster

    def start_bed(self) -> SshControlPlane:
        self.bed = SshControlPlane(self.dir / "bed", "static-pod", 3)
        self.bed.start()
        return self.bed

    async def seed(self) -> None:
        endpoints = self.bed.endpoints if self.bed is not None else self.cluster.endpoints
        async with EtcdClient(endpoints) as client:
            for key, value in SEED:
                await client.put(key.encode(), json.dumps(value).encode())

    def start_slack_and_bot(self) -> None:
        bot_port = free_port()
        fixtures = self.dir / "fixtures.json"
        fixtures.write_text(json.dumps({"users": USERS, "usergroups": USERGROUPS, "channels": CHANNELS}))
        ready = self.dir / "standin.url"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLACK_")}
        env.update(SLACK_BOT_TOKEN=self.creds.bot_token, SLACK_SIGNING_SECRET=self.creds.signing_secret)
        with open(self.dir / "standin.log", "ab") as log:
            self.standin = subprocess.Popen(
                [sys.executable, "-m", "bot.testing.slack", "--port", "0", "--ready-file", str(ready),
                 "--fixtures", str(fixtures), "--bot-url", f"http://127.0.0.1:{bot_port}/slack/events"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 20
        while not ready.is_file():
            if self.standin.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the Slack stand-in did not start:\n{log_tail(self.dir / 'standin.log')}")
            time.sleep(0.05)
        self.standin_url = ready.read_text().strip()
        watch = {"enabled": True, "interval": "1s", "grace": "2s"} if self.watch else {"enabled": False}
        if self.bed is not None:
            table = self.bed.cluster("demo", snapshots={"keep_last": 5}, watch=watch)
        else:
            assert self.cluster is not None, "the cluster starts first"
            table = cluster_table("demo", self.cluster, snapshots={"keep_last": 5}, watch=watch)
        config = write_config(self.dir, [table],
                              approval={"approvers": [LEAD], "approver_groups": [LEADS_GROUP], "ttl_minutes": 30})
        self.bot = BotProcess(config, self.standin_url + "/api/", self.creds, self.dir / "bot.log",
                              port=bot_port).start()

    def state(self) -> DemoState:
        return DemoState(directory=str(self.dir), standin_url=self.standin_url, standin_pid=self.standin.pid,
                         bot_url=self.bot.url, bot_pid=self.bot.proc.pid, cluster_dir=str(self.cluster.base_dir))

    def teardown(self) -> None:
        """Stop everything and remove every file; safe to call twice or half-started."""
        if self.bot is not None:
            self.bot.stop()
        if self.standin is not None and self.standin.poll() is None:
            self.standin.terminate()
            try:
                self.standin.wait(10)
            except subprocess.TimeoutExpired:
                self.standin.kill()
                self.standin.wait(5)
        if self.cluster is not None:
            self.cluster.close()
        if self.bed is not None:
            self.bed.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_kept(directory: Path) -> str:
    """`demo --stop`: end a demo left running with --keep."""
    state = DemoState.load(directory)
    for pid in (state.bot_pid, state.standin_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(directory).encode() in cmdline or b"bot.testing.slack" in cmdline:
            os.kill(pid, signal.SIGTERM)
            _wait_pid(pid)
    LocalCluster.attach(state.cluster_dir).close()
    shutil.rmtree(directory, ignore_errors=True)
    return f"stopped the demo in {directory}"


def _wait_pid(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]:
            return
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the story

PLAN_ID = re.compile(r"\bPlan (\w+), proposed by ")  # a plan message's text, after its headline

def posted_plan(posted: list[dict[str, Any]], what: str) -> tuple[dict[str, Any], str]:
    """The plan message among what a command posted, and its plan ID."""
    for message in posted:
        found = None if message.get("thread_ts") else PLAN_ID.search(message["text"])
        if found:
            return message, found.group(1)
    raise DemoError(f"the bot did not post {what}")


async def run_to_done(channel: ChannelClient, spinner: Spinner, plan_id: str, label: str) -> dict[str, Any]:
    """Follow an approved plan's thread until it ends; it must end done."""
    async with spinner.running(label):
        end = await channel.follow(re.compile(rf"Plan {plan_id} (is done|stopped|cannot run)"), PLAN_TIMEOUT)
    if "is done" not in end["text"]:
        raise DemoError(f"plan {plan_id} did not complete: {end['text']}")
    return end


async def stage(stack: Stack, out: TextIO, style: Style,
                starting: str) -> tuple[Spinner, Callable[[str], None], LocalCluster]:
    """What every scenario starts with: the cluster (seeded), the Slack stand-in and the bot."""
    spinner = Spinner(sys.stderr if style.colour else out, style)

    def narrate(text: str) -> None:
        print(style.paint(f"── {text}", "36"), file=out, flush=True)

    async with spinner.running(starting):
        cluster = await asyncio.to_thread(stack.start_cluster)
        await stack.seed()
    async with spinner.running("starting the Slack stand-in and the bot"):
        await asyncio.to_thread(stack.start_slack_and_bot)
    return spinner, narrate, cluster


async def play(stack: Stack, out: TextIO, style: Style) -> dict[str, str]:
    started = time.monotonic()
    spinner, narrate, cluster = await stage(stack, out, style, "starting a local 3-member etcd cluster")
    narrate(f"etcd cluster 'demo' up ({', '.join(cluster.endpoints)}); #{CHANNELS[CHANNEL]} is bound to it\n")

    async with ChannelClient(stack.standin_url, out, style) as channel:
        await channel.say("status")
        narrate("member1's machine dies (SIGKILL)\n")
        cluster.kill("member1")
        await channel.say("status")

        peer, client = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
        narrate("the on-call engineer proposes the runbook's replacement\n")
        posted = await channel.say(f"replace member1 member4 {peer} --client-url {client}")
        plan_msg, plan_id = posted_plan(posted, "a plan")

        narrate("someone who is not on call tries to approve\n")
        await channel.react(STRANGER, plan_msg["ts"], "white_check_mark")
        narrate("the on-call lead approves\n")
        await channel.react(LEAD, plan_msg["ts"], "white_check_mark", wait=0)
        await run_to_done(channel, spinner, plan_id, f"the bot executes plan {plan_id}")

        narrate("after the replacement\n")
        await channel.say("status")
        async with spinner.running("taking a verified snapshot"):
            snap = await channel.say("snapshot", wait=60)
    text = " ".join(m["text"] for m in snap)
    found = re.search(r"hash (\w+), revision (\d+)", text)
    if not found:
        raise DemoError(f"no snapshot result: {text[:300]}")
    return {"seconds": f"{time.monotonic() - started:.1f}", "plan": plan_id, "hash": found.group(1),
            "revision": found.group(2)}


async def play_restore(stack: Stack, out: TextIO, style: Style) -> dict[str, str]:
    """`--scenario restore`: a quorum-loss incident, recovered from the last verified snapshot under two approvals."""
    started = time.monotonic()
    spinner, narrate, cluster = await stage(stack, out, style, "starting a local 3-member etcd cluster")
    narrate(f"etcd cluster 'demo' up ({', '.join(cluster.endpoints)}); #{CHANNELS[CHANNEL]} is bound to it\n")

    async with ChannelClient(stack.standin_url, out, style) as channel:
        await channel.say("status")
        async with spinner.running("taking a verified snapshot"):
            await channel.say("snapshot", wait=60)
        narrate("a bad deploy writes after the snapshot; then member1 and member2's machines die (SIGKILL)\n")
        async with EtcdClient(cluster.endpoints) as client:
            await client.put(b"/registry/configmaps/default/written-after-the-snapshot", b"{}")
        cluster.kill("member1")
        cluster.kill("member2")
        await channel.say("status")
        narrate("quorum is lost: the on-call engineer proposes a restore from the newest verified snapshot\n")
        posted = await channel.say("restore")
        plan_msg, plan_id = posted_plan(posted, "a restore plan")
        narrate("the proposer, who is not an approver, tries to approve\n")
        await channel.react(ONCALL, plan_msg["ts"], "white_check_mark")
        narrate("the first on-call lead approves: one of two\n")
        await channel.react(LEAD, plan_msg["ts"], "white_check_mark")
        narrate("the second on-call lead approves\n")
        await channel.react(LEAD2, plan_msg["ts"], "white_check_mark", wait=0)
        end = await run_to_done(channel, spinner, plan_id, f"the bot restores every member (plan {plan_id})")
        narrate("after the restore\n")
        await channel.say("status")
    found = re.search(r"revision (\d+)", end["text"])
    seconds = f"{time.monotonic() - started:.1f}"
    return {"seconds": seconds, "plan": plan_id,
            "closing": f"Incident played in {seconds} s: plan {plan_id} done; cluster restored at revision "
                       f"{found.group(1) if found else '?'}."}


async def play_nospace(stack: Stack, out: TextIO, style: Style) -> dict[str, str]:
    """The NOSPACE incident: writes fail, the alarm, the defrag plan, one approval, writes work again."""
    started = time.monotonic()
    spinner, narrate, cluster = await stage(stack, out, style,
                                            "starting a local 3-member etcd cluster with a 16 MiB quota")
    narrate(f"etcd cluster 'demo' up ({', '.join(cluster.endpoints)}), --quota-backend-bytes 16 MiB\n")
    narrate("a runaway controller rewrites big objects until the database is full\n")
    writes = await fill_until_nospace(cluster)
    async with EtcdClient(cluster.endpoints) as client:
        try:
            await client.put(b"/registry/pods/default/web-1", b"{}")
            raise DemoError("the write succeeded: no NOSPACE")
        except EtcdError as e:
            narrate(f"after {writes} writes, kube-apiserver's writes fail: {e.message}\n")

    async with ChannelClient(stack.standin_url, out, style) as channel:
        await channel.say("status")
        narrate("the on-call engineer proposes the rolling defragmentation\n")
        posted = await channel.say("defrag")
        plan_msg, plan_id = posted_plan(posted, "a plan")
        narrate("the on-call lead approves\n")
        await channel.react(LEAD, plan_msg["ts"], "white_check_mark", wait=0)
        await run_to_done(channel, spinner, plan_id, f"the bot executes plan {plan_id}")
        narrate("after the defragmentation\n")
        await channel.say("status")
    async with EtcdClient(cluster.endpoints) as client:
        revision = await client.put(b"/registry/pods/default/web-1", b"{}")
    narrate(f"kube-apiserver's writes succeed again (revision {revision})\n")
    return {"seconds": f"{time.monotonic() - started:.1f}", "plan": plan_id,
            "closing": f"NOSPACE incident played in {time.monotonic() - started:.1f} s: plan {plan_id} done; "
                       f"writes succeed again."}


async def play_kubeadm(stack: Stack, out: TextIO, style: Style) -> dict[str, str]:
    """`--scenario kubeadm`: the restore of a kubeadm control plane done on its hosts over SSH: three hosts (network
    namespaces of the multi-host bed), each with sshd, etcd-chatops-node as the bot key's forced command, and
    etcd and kube-apiserver as static pods."""
    started = time.monotonic()
    spinner = Spinner(sys.stderr if style.colour else out, style)

    def narrate(text: str) -> None:
        print(style.paint(f"── {text}", "36"), file=out, flush=True)

    async with spinner.running("starting 3 control-plane hosts: sshd, etcd and kube-apiserver as static pods"):
        bed = await asyncio.to_thread(stack.start_bed)
        await stack.seed()
    async with spinner.running("starting the Slack stand-in and the bot"):
        await asyncio.to_thread(stack.start_slack_and_bot)
    hosts = ", ".join(f"{n} ({h.host.client_ip})" for n, h in bed.hosts.items())
    narrate(f"kubeadm control plane 'demo' up on {hosts}: the bot reaches each host over SSH, host keys pinned, "
            "its key's forced command etcd-chatops-node\n")
    async with ChannelClient(stack.standin_url, out, style) as channel:
        await channel.say("status")
        narrate("the dry run the watch repeats daily: every host's key, forced command and etcdutl\n")
        await channel.say("launcher-check")
        async with spinner.running("taking a verified snapshot"):
            await channel.say("snapshot", wait=60)
        narrate("a bad deploy writes after the snapshot; then the disks of m1 and m2 fail: their etcd crash-loops\n")
        async with EtcdClient(bed.endpoints) as client:
            await client.put(b"/registry/configmaps/default/written-after-the-snapshot", b"{}")
        for name in ("m1", "m2"):
            await asyncio.to_thread(bed.damage, name)
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(bed.leaderless, "m3"):
            if time.monotonic() > deadline:
                raise DemoError("m3 did not lose its leader")
            await asyncio.sleep(0.2)
        await channel.say("status")
        narrate("quorum is lost: the on-call engineer proposes the restore; the bot will run it on the hosts\n")
        posted = await channel.say("restore")
        plan_msg, plan_id = posted_plan(posted, "a restore plan")
        narrate("two on-call leads approve\n")
        await channel.react(LEAD, plan_msg["ts"], "white_check_mark")
        await channel.react(LEAD2, plan_msg["ts"], "white_check_mark", wait=0)
        await run_to_done(channel, spinner, plan_id,
                          f"the bot stops kube-apiserver and etcd, restores and starts every host (plan {plan_id})")
        narrate("after the restore\n")
        await channel.say("status")
    manifest = bed.hosts["m1"].files.manifests / "etcd.yaml"
    restored = next((line.split(":", 1)[1].strip() for line in manifest.read_text().splitlines()
                     if line.strip().startswith("path:")), "?")
    narrate(f"m1's etcd.yaml now mounts {restored}; kube-apiserver.yaml is back in its manifests directory\n")
    seconds = f"{time.monotonic() - started:.1f}"
    return {"seconds": seconds, "plan": plan_id,
            "closing": f"kubeadm incident played in {seconds} s: plan {plan_id} done on 3 hosts over SSH."}


async def play_alerts(stack: Stack, out: TextIO, style: Style) -> dict[str, str]:
    """`--scenario alerts`: nobody types anything; the watch notices a member die, posts the alert with the next
    command, and resolves it when the member is back."""
    started = time.monotonic()
    spinner, narrate, cluster = await stage(stack, out, style, "starting a local 3-member etcd cluster")
    narrate(f"etcd cluster 'demo' up ({', '.join(cluster.endpoints)}); the watch looks every second and posts a "
            "condition that lasts 2 s\n")
    async with ChannelClient(stack.standin_url, out, style) as channel:
        await channel.say("status")
        narrate("member2's machine dies (SIGKILL); nobody types anything\n")
        cluster.kill("member2")
        async with spinner.running("the watch looks"):
            await channel.follow(re.compile(r"MEMBER DOWN member2"), 60)
        narrate("member2's machine comes back\n")
        await asyncio.to_thread(cluster.restart, "member2")
        async with spinner.running("the watch looks"):
            await channel.follow(re.compile(r"resolved after"), 60)
        await channel.say("alerts")
    seconds = f"{time.monotonic() - started:.1f}"
    return {"seconds": seconds, "closing": f"Alerts played in {seconds} s: member2 was down, posted by the watch "
                                           "with the next command, and resolved when it came back."}


SCENARIOS = {"replace": (play, ()), "nospace": (play_nospace, QUOTA_ARGS), "restore": (play_restore, ()),
             "alerts": (play_alerts, ()), "kubeadm": (play_kubeadm, ())}


def run_demo(directory: Path | None, keep: bool, out: TextIO = sys.stdout, scenario: str = "replace") -> int:
    style = Style(colour=out.isatty() and os.environ.get("NO_COLOR") is None)
    if directory is None:
        directory = default_dir() if keep else Path(tempfile.mkdtemp(prefix="etcd-chatops-demo-"))
    if scenario == "kubeadm" and (reason := sshd_missing()):
        print(f"the kubeadm scenario cannot run here: {reason}", file=sys.stderr)
        return 2
    if scenario == "kubeadm" and keep:
        print("the kubeadm scenario cannot be kept: its hosts live only as long as the demo process", file=sys.stderr)
        return 2
    if (directory / STATE_FILE).exists():
        print(f"a kept demo is already running in {directory}: stop it with `etcd-chatops demo --stop`",
              file=sys.stderr)
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    story, extra_args = SCENARIOS[scenario]
    stack = Stack(directory, keep, extra_args, watch=scenario == "alerts")
    ok = False
    loop = asyncio.new_event_loop()
    main = loop.create_task(story(stack, out, style))
    # Ctrl-C and SIGTERM cancel the story through the loop: a KeyboardInterrupt raised wherever the main thread
    # happens to be (a gRPC callback, a finalizer) can be swallowed there, and the demo would play on.
    stopped_by: list[signal.Signals] = []

    def stop(signum: signal.Signals) -> None:
        stopped_by.append(signum)
        main.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        summary = loop.run_until_complete(main)
        ok = True
    except (KeyboardInterrupt, asyncio.CancelledError):
        main.cancel()
        loop.run_until_complete(asyncio.gather(main, return_exceptions=True))
        if signal.SIGTERM in stopped_by:
            print("\nterminated: cleaning up", file=sys.stderr)
            return 143
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        if stack.bot is not None:
            print(f"bot log tail:\n{log_tail(stack.dir / 'bot.log')}", file=sys.stderr)
        return 1
    finally:
        loop.close()
        if not (ok and keep):
            stack.teardown()
    print(style.bold(summary.get("closing") or f"Incident played in {summary['seconds']} s: plan {summary['plan']} "
                     f"done; snapshot hash {summary['hash']} at revision {summary['revision']}."), file=out)
    if keep:
        stack.state().save()
        print(kept_help(stack, directory), file=out)
    else:
        print("Everything the demo started is stopped and its files are removed.", file=out)
    return 0


def kept_help(stack: Stack, directory: Path) -> str:
    """What to try in a kept demo, with the ports and processes of this one."""
    cli = "etcd-chatops" if shutil.which("etcd-chatops") else f"{Path(sys.executable).parent}/etcd-chatops"
    cluster = stack.cluster
    assert cluster is not None
    dies = ("the watch posts the alert within seconds (say \"/etcd alerts\")" if stack.watch else
            "(with --scenario alerts the watch would post it)")
    return (f"\nThe cluster, the Slack stand-in and the bot keep running (files in {directory}).\n"
            f"Run etcd-chatops as {cli} (or `make shell` first, then plain etcd-chatops):\n"
            f"  kill -9 {cluster.member('member3').pid}   # member3's machine dies; {dies}\n"
            f"  {cli} say \"/etcd status\"                   # as alice, the on-call engineer (an operator)\n"
            f"  {cli} say \"/etcd replace member3 member5 http://127.0.0.1:{free_port()} "
            f"--client-url http://127.0.0.1:{free_port()}\"\n"
            f"  {cli} say --as bob :white_check_mark:        # bob, the lead, approves the newest plan\n"
            f"  {cli} say --as bob \"/etcd plans\"\n"
            f"  {cli} demo --stop                            # stop everything and remove the files")


async def say(directory: Path, text: str, person: str, out: TextIO = sys.stdout, plan: str | None = None) -> int:
    """Type `/etcd ...` in the kept demo's channel as `person`; or react with `:name:` to a plan's message (the
    newest plan, or `plan`): that is how a lead approves (`:white_check_mark:`) or rejects (`:x:`)."""
    state = DemoState.load(directory)
    style = Style(colour=out.isatty() and os.environ.get("NO_COLOR") is None)
    text = text.strip()
    reaction = re.fullmatch(r":([a-z0-9_+'-]+):", text)
    if text.startswith("/etcd"):
        text = text[len("/etcd"):].strip()
    async with ChannelClient(state.standin_url, out, style) as channel:
        if reaction is None:
            if plan is not None:
                raise DemoError("--plan goes with a reaction (:white_check_mark:), not with a command")
            await channel.say(text, PEOPLE[person])
            return 0
        message = await channel.plan_message(plan)
        channel.seen = message["index"] + 1
        await channel.react(PEOPLE[person], message["ts"], reaction.group(1))
    return 0
