"""A sandbox's own network namespace and its uplink, made before the sandbox starts.

The namespace is created by the host, outside the sandbox's user namespace, and its
rules (`corral.network.nftables`) are loaded before the sandbox's first instruction;
bubblewrap then joins it (`nsenter --net=…`, no `--unshare-net`). Code in the sandbox can
neither change the rules nor make a namespace of its own: it holds no capability over a
namespace its user namespace does not own.

The uplink, as root: a veth pair, the host end `crl<12 hex>` in the host's namespace and
`eth0` inside, with addresses from a pool (a /30 of `POOL4` and a /64 of `POOL6` per
sandbox, slot n, allocated host-wide like uid slots), a default route
through the host end, and one host table `inet corral_host` that masquerades the pool,
keeps sandboxes from each other and keeps them from opening connections to the host
itself. Without root the uplink is slirp4netns instead (`corral.isolation.usernet`).

Everything is recorded in the sandbox's `Footprint` before it is made, so `release` (and
the reaper, after a crash) removes it: the namespace's bind mount, the veth, the slot.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corral.errors import SandboxStartFailed
from corral.isolation import nsholder, rtnetlink
from corral.limits import Limits
from corral.network import nftables
from corral.network.setns import CLONE_NEWNET, call_in_netns

if TYPE_CHECKING:
    from corral.isolation.footprint import Footprint

POOL4 = ipaddress.IPv4Network("10.213.0.0/16")
POOL6 = ipaddress.IPv6Network("fd00:213::/48")
SLOTS = POOL4.num_addresses // 4  # a /30 each
HOST_TABLE = "corral_host"
VETH_PREFIX = "crl"

_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Addresses:
    """The uplink's addresses for pool slot `slot`: host end and sandbox end."""

    slot: int

    @property
    def host4(self) -> ipaddress.IPv4Address:
        return POOL4[4 * self.slot + 1]

    @property
    def sandbox4(self) -> ipaddress.IPv4Address:
        return POOL4[4 * self.slot + 2]

    @property
    def host6(self) -> ipaddress.IPv6Address:
        return POOL6[(self.slot << 64) + 1]

    @property
    def sandbox6(self) -> ipaddress.IPv6Address:
        return POOL6[(self.slot << 64) + 2]


@functools.cache
def tools_missing() -> tuple[str, ...]:
    """What this host lacks to give sandboxes a network, as install hints: as root a veth
    uplink (here), without root a user-mode one (`corral.isolation.usernet`)."""
    missing = []
    if os.geteuid() == 0:
        tools = [("tc", "iproute2"), ("nsenter", "util-linux")]
    else:
        tools = [
            ("slirp4netns", "slirp4netns"),
            ("unshare", "util-linux"),
            ("nsenter", "util-linux"),
        ]
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            missing.append(
                "/dev/net/tun usable by this user (slirp4netns needs it; stock Debian has "
                "it 0666: chmod 0666 /dev/net/tun), or run as root"
            )
    for tool, package in tools:
        if shutil.which(tool) is None:
            missing.append(f"{tool}: apt-get install {package}")
    if not nsholder.libnftables_present():
        missing.append("libnftables: apt-get install nftables")
    return tuple(missing)


def reserve(footprint: Footprint, runtime_dir: Path) -> Addresses:
    """Take an address slot and record the namespace and veth `build` will make, in
    `footprint`, before anything exists: a crash from here on leaves nothing unrecorded."""
    slot = footprint.claim_net_slot(runtime_dir, SLOTS)
    footprint.netns = str(footprint.path / "netns")
    footprint.veth = VETH_PREFIX + footprint.id[-12:]
    footprint.save()
    return Addresses(slot)


def build(footprint: Footprint, addresses: Addresses, limits: Limits, script: str) -> None:
    """Make the namespace and uplink `reserve` recorded and load `script` (the sandbox's
    nft rules) in it, all in-process (netlink, libnftables; `tc` only for a bandwidth
    cap). Blocking; it writes nothing to `footprint`, so it may run while the sandbox's
    launch is prepared."""
    assert footprint.netns is not None and footprint.veth is not None
    ensure_host()
    path, veth = Path(footprint.netns), footprint.veth
    # In a fresh thread (of the host's namespace): unshare moves its caller.
    call_in_netns("/proc/self/ns/net", lambda: _new_netns(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with rtnetlink.netlink() as host:
                host.add_veth(veth, "eth0", fd)
                host.add_address(veth, addresses.host4, 30)
                host.add_address(veth, addresses.host6, 64)
                host.set_up(veth)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SandboxStartFailed(f"could not make the sandbox's uplink {veth}: {exc}") from exc
    if limits.bandwidth_mbit:  # downloads leave through the host end
        _run(["tc", "-batch", "-"], _shape(veth, limits.bandwidth_mbit))

    def configure() -> None:
        try:
            with rtnetlink.netlink() as inside:
                inside.set_up("lo")
                inside.add_address("eth0", addresses.sandbox4, 30)
                inside.add_address("eth0", addresses.sandbox6, 64)
                inside.set_up("eth0")
                inside.add_default_route("eth0", addresses.host4)
                inside.add_default_route("eth0", addresses.host6)
        except OSError as exc:
            raise SandboxStartFailed(f"could not set up the sandbox's network: {exc}") from exc
        if limits.bandwidth_mbit:
            _run(["tc", "-batch", "-"], _shape("eth0", limits.bandwidth_mbit))
        nft(script)

    call_in_netns(str(path), configure)


def remove(netns_path: str | None, veth: str | None) -> None:
    """Remove a sandbox's uplink and namespace; quiet about what is already gone."""
    if veth:
        try:
            with rtnetlink.netlink() as host:
                host.delete_link(veth)  # and its peer with it
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise
    if netns_path and Path(netns_path).is_symlink():  # rootless: its holder keeps it
        Path(netns_path).unlink(missing_ok=True)
    elif netns_path:
        if _libc.umount2(netns_path.encode(), _MNT_DETACH) and ctypes.get_errno() not in (
            errno.EINVAL,
            errno.ENOENT,
        ):
            raise OSError(ctypes.get_errno(), f"umount {netns_path}")
        Path(netns_path).unlink(missing_ok=True)


@functools.cache
def ensure_host() -> None:
    """The host side every uplink needs, once per process: forwarding on, and the table
    `inet corral_host` (replaced whole: the same for every Corral process)."""
    for knob in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        path = Path("/proc/sys/net") / knob
        if path.read_text().strip() != "1":
            path.write_text("1\n")
    nft(host_table())


def host_table() -> str:
    sandboxes = f'iifname "{VETH_PREFIX}*"'
    return "\n".join(
        [
            f"table inet {HOST_TABLE} {{}}",
            f"delete table inet {HOST_TABLE}",
            f"table inet {HOST_TABLE} {{",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    ip saddr {POOL4} ip daddr != {POOL4} masquerade",
            f"    ip6 saddr {POOL6} ip6 daddr != {POOL6} masquerade",
            "  }",
            # Sandboxes never reach each other, whatever their own rules say.
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f'    {sandboxes} oifname "{VETH_PREFIX}*" drop',
            "  }",
            # Nor the host's own services, on any of its addresses: a sandbox's DNS
            # resolver and port proxy are reached through its own loopback instead.
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f"    {sandboxes} ct state established,related accept",
            f"    {sandboxes} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept",
            f"    {sandboxes} meta l4proto tcp reject with tcp reset",
            f"    {sandboxes} drop",
            "  }",
            "}",
            "",
        ]
    )


def nft(script: str, *, json_output: bool = False) -> str:
    """Run an nft script in the calling thread's network namespace, as one transaction;
    its output. Through libnftables in-process: an `nft -f` exec costs ~4 ms more."""
    try:
        return nsholder.run_nft(script, json_output=json_output)
    except nsholder.NftError as exc:
        raise SandboxStartFailed(f"loading the sandbox's network rules failed: {exc}") from exc
    except OSError as exc:
        raise SandboxStartFailed(str(exc)) from exc


COUNTERS = f"list counters table inet {nftables.TABLE}"


def parse_counters(output: str) -> dict[str, int]:
    """`COUNTERS`' JSON listing as packets by counter name."""
    return {
        item["counter"]["name"]: int(item["counter"]["packets"])
        for item in json.loads(output)["nftables"]
        if "counter" in item
    }


def _shape(device: str, mbit: int) -> str:
    # The bucket holds ~20 ms of traffic (at least a few full-size packets).
    burst = max(mbit * 1_000_000 // 8 // 50, 16 * 1024)
    return f"qdisc add dev {device} root tbf rate {mbit}mbit burst {burst} latency 100ms\n"


def _new_netns(path: Path) -> None:
    """A new network namespace, kept alive by a bind mount on `path`. Call it in a
    thread of its own: unshare moves the calling thread into the new namespace."""
    if _libc.unshare(CLONE_NEWNET):
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    path.touch(mode=0o444)
    source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
    if _libc.mount(source, str(path).encode(), None, _MS_BIND, None):
        raise OSError(ctypes.get_errno(), f"bind mount of a network namespace on {path}")


def _run(argv: list[str], script: str) -> None:
    done = subprocess.run(argv, input=script, capture_output=True, text=True)
    if done.returncode != 0:
        raise SandboxStartFailed(
            f"setting up the sandbox's network failed: {' '.join(argv)}: {done.stderr.strip()}"
        )
