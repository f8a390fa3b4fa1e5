"""The webhook address guard: which addresses a delivery may reach.

A webhook URL is the client's to choose, so without a guard a job could make the webhook
worker probe the deployment's own network (loopback, private ranges, the cloud metadata
service at 169.254.169.254). Only public addresses pass, checked when a job is created and
again on the very address each connection goes to.

IPv6 has several forms that carry an IPv4 address inside them; reaching one reaches that
IPv4 host through a translator, a relay or the host's own stack. Each is judged by the IPv4
address it carries, so ``[64:ff9b::7f00:1]`` is loopback, as ``127.0.0.1`` is.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from blaze_jobs.errors import BlazeError

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

#: Ranges whose last 32 bits are an IPv4 address that the address stands for.
IPV4_IN_LAST_32_BITS = (
    ipaddress.ip_network("::ffff:0:0/96"),  # IPv4-mapped (RFC 4291)
    ipaddress.ip_network("::/96"),  # IPv4-compatible, deprecated (RFC 4291); :: and ::1 too
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    ipaddress.ip_network("64:ff9b::/96"),  # NAT64, the well-known prefix (RFC 6052)
)
#: Ranges refused whole. NAT64's local-use prefix (RFC 8215) puts the IPv4 address where the
#: operator's prefix length says, which an address does not tell. Teredo (RFC 4380) relays to
#: an IPv4 client whose address it stores inverted, beside its server's; no receiver needs it.
REFUSED_WHOLE = (
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("2001::/32"),
)
#: 6to4 (RFC 3056): the site's IPv4 address is bits 16 to 48.
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
#: ISATAP interface identifiers (RFC 5214): ``0:5efe`` or ``200:5efe``, then an IPv4 address.
ISATAP_MARKS = (0x00005EFE, 0x02005EFE)


class WebhookRefused(BlazeError):
    """The webhook URL resolves to an address deliveries must not reach."""


def carried_ipv4(ip: IPv6) -> IPv4 | None:
    """The IPv4 address a 6to4 or ISATAP address carries, if it is one."""
    if ip in SIX_TO_FOUR:
        return IPv4((int(ip) >> 80) & 0xFFFFFFFF)
    if (int(ip) >> 32) & 0xFFFFFFFF in ISATAP_MARKS:
        return IPv4(int(ip) & 0xFFFFFFFF)
    return None


def public_address(address: str) -> bool:
    """True for an address on the public internet; false for loopback, private, link-local
    (cloud metadata at 169.254.169.254 among them), shared, multicast and reserved ones, and
    for every IPv6 form of such an IPv4 address (mapped, compatible, NAT64, 6to4, …)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, IPv6):
        if any(ip in network for network in REFUSED_WHOLE):
            return False
        if any(ip in network for network in IPV4_IN_LAST_32_BITS):
            # The address is its IPv4 host: judged as that (Python counts some of these
            # ranges as global, and the mapped one as not, whatever they carry).
            return _public(IPv4(int(ip) & 0xFFFFFFFF))
        carried = carried_ipv4(ip)
        if carried is not None and not _public(carried):
            return False
    return _public(ip)


def _public(ip: IPv4 | IPv6) -> bool:
    return ip.is_global and not ip.is_multicast


def check_addresses(host: str, addresses: Iterable[str]) -> list[str]:
    """``addresses`` when every one is public; raises ``WebhookRefused`` otherwise."""
    found = list(dict.fromkeys(addresses))
    if not found:
        raise WebhookRefused(f"{host} does not resolve to any address")
    for address in found:
        if not public_address(address):
            raise WebhookRefused(
                f"{host} resolves to {address}, a loopback, private, link-local or reserved address "
                "(set BLAZE_WEBHOOK_ALLOW_PRIVATE to allow it)"
            )
    return found


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to; raises ``WebhookRefused`` when it does not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise WebhookRefused(f"{host} does not resolve: {error.strerror}") from None
    return [str(info[4][0]) for info in infos]
