"""Where the etcd, etcdctl and etcdutl binaries are: see bot.etcd.binaries (the bot's drills need them too)."""
from bot.etcd.binaries import NAMES, BinaryNotFound, bin_dirs, find_binary

__all__ = ["NAMES", "BinaryNotFound", "bin_dirs", "find_binary"]
