"""A microVM guest's network: a tap in the sandbox's own network namespace, routed.

A sandbox with `internet` or `allowlist` gets the namespace every tier gets
(`corral.isolation.netns`: its veth uplink, its rules in table `inet corral`, its
resolver). For a microVM, `attach` adds a tap `GUEST_LINK` there once the namespace is
made, before QEMU starts: QEMU (still root, before `-runas`) opens it by name and gives
the guest a `virtio-net-device` on it. The guest's traffic is routed through the
namespace, so it crosses the forward hook, whose chain is the same `decide` chain a
namespace sandbox's output crosses: one policy, the same rules, the same counters and
log. What the namespace adds for the guest, in tables of its own that a policy change
never replaces:
- anti-spoofing at the tap's ingress (table `netdev corral_vm`): only frames from the
  guest's MAC, carrying the guest's addresses (and ARP for them), get in; a guest that
  changes its address or MAC is cut off, never let through as someone else;
- masquerade of the guest's address to the namespace's own on `eth0` (table
  `inet corral_vm`): outside, the guest is the sandbox address a namespace sandbox
  would be, so the host's table `inet corral_host` treats it the same;
- its DNS: queries to the gateway's port 53 go to the sandbox's resolver on the
  namespace's loopback (DNAT, with `route_localnet` on the tap alone; the input chain of
  `inet corral` accepts exactly that, `nftables.GUEST_LINK`).
The addresses are the same in every sandbox (each tap is alone in its namespace), so
nothing of them is allocated. The guest configures them itself from its config disk
(`corral.guest.vm_boot`), never from QEMU's command line.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct

from corral.errors import IsolationUnavailable, SandboxStartFailed
from corral.isolation import netns, rtnetlink
from corral.network.nftables import GUEST_LINK
from corral.network.policy import NetworkPolicy
from corral.network.resolver import ADDRESS as RESOLVER
from corral.network.setns import call_in_netns

# The guest's link, the same in every sandbox. Private ranges (always denied unless an
# operator allows them): the one destination a guest cannot reach is its own /30 and /64.
GATEWAY4 = ipaddress.IPv4Address("10.0.2.1")
GUEST4 = ipaddress.IPv4Address("10.0.2.2")
PREFIX4 = 30
GATEWAY6 = ipaddress.IPv6Address("fd00:0:2::1")
GUEST6 = ipaddress.IPv6Address("fd00:0:2::2")
PREFIX6 = 64
# A locally administered unicast MAC; the tap's ingress admits no other.
GUEST_MAC = "52:54:00:c0:a1:02"

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000


def network_modes() -> frozenset[str]:
    """The modes the microvm tier enforces here: a policy needs root (the tap and the
    namespace's uplink) and what every tier's uplink needs (`netns.tools_missing`)."""
    if os.geteuid() != 0 or netns.tools_missing() or not os.path.exists("/dev/net/tun"):
        return frozenset({"none"})
    return frozenset({"none", "internet", "allowlist"})


def check_checkpoint(policy: NetworkPolicy, what: str) -> None:
    """Refuse a memory snapshot of (or a restore into) a microVM with a network: its
    guest's connections and its resolver's answers live in the host's namespace and
    rules, which a checkpoint does not carry."""
    if policy.mode != "none":
        raise IsolationUnavailable(
            f"the microvm tier cannot {what} with network {policy.mode!r}: the guest's "
            "open connections and the addresses its resolver opened are host state "
            "(its namespace's rules and conntrack) that a checkpoint does not keep; "
            "create the sandbox with network 'none' to keep its memory"
        )


def qemu_args() -> list[str]:
    """QEMU's network device for a guest with a network: the tap `attach` made, opened
    by name while QEMU is root (no script: QEMU spawns nothing)."""
    return [
        "-netdev", f"tap,id=net,ifname={GUEST_LINK},script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=net,mac={GUEST_MAC}",
    ]  # fmt: skip


def guest_config() -> str:
    """The guest's addresses and gateways, as the config disk carries them: one field,
    `net ADDR4/PREFIX GATEWAY4 ADDR6/PREFIX GATEWAY6` (no `=`: never an environment entry)."""
    return f"net {GUEST4}/{PREFIX4} {GATEWAY4} {GUEST6}/{PREFIX6} {GATEWAY6}"


def attach(netns_path: str) -> None:
    """Make the guest's tap in the namespace at `netns_path` (already made, its rules
    loaded) and route it: addresses, forwarding, anti-spoofing, masquerade, DNS.
    Blocking; everything made is inside the namespace, so it goes with it."""
    call_in_netns(netns_path, _attach)


def _attach() -> None:
    try:
        _make_tap()
        for knob, value in (
            ("ipv4/ip_forward", "1"),
            ("ipv6/conf/all/forwarding", "1"),
            (f"ipv4/conf/{GUEST_LINK}/route_localnet", "1"),
            (f"ipv6/conf/{GUEST_LINK}/accept_dad", "0"),
        ):
            with open(f"/proc/sys/net/{knob}", "w") as f:
                f.write(value)
        with rtnetlink.netlink() as inside:
            inside.add_address(GUEST_LINK, GATEWAY4, PREFIX4)
            inside.add_address(GUEST_LINK, GATEWAY6, PREFIX6)
            inside.set_up(GUEST_LINK)
    except OSError as exc:
        raise SandboxStartFailed(f"could not make the microVM's network device: {exc}") from exc
    netns.nft(_rules())


def _make_tap() -> None:
    """A persistent tap `GUEST_LINK` in the calling thread's namespace, with the flags
    QEMU opens it with (a vnet header: virtio-net's offloads)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH", GUEST_LINK.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, request)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _rules() -> str:
    link = f'"{GUEST_LINK}"'
    return f"""
table netdev corral_vm {{
  chain ingress {{
    type filter hook ingress device {link} priority -500; policy drop;
    ether saddr != {GUEST_MAC} drop
    arp saddr ether {GUEST_MAC} arp saddr ip {GUEST4} accept
    ip saddr {GUEST4} accept
    ip6 saddr {{ {GUEST6}, fe80::/64, :: }} accept
  }}
}}
table inet corral_vm {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {link} ip daddr {GATEWAY4} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {RESOLVER}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {GUEST4} oifname "eth0" masquerade
    ip6 saddr {GUEST6} oifname "eth0" masquerade
  }}
}}
"""
