"""Webhook rules, pure: which callback URLs are accepted, which addresses they may reach, and
how a delivery is signed.

A callback URL is ``http`` or ``https`` with a host, no user info, at most 2048 characters.
Callbacks are a server-side request forgery risk: a team could aim them at the operator's own
network (a metadata service, an admin port). So by default a destination must resolve only to
public addresses: loopback, private, link-local, multicast, reserved and unspecified addresses
are refused unless ``[webhooks] allow_private = true``. ``allowed_hosts`` (host names, IPs or
CIDRs) are always allowed; with ``only_allowed_hosts = true`` nothing else is. The deliverer
checks every address a name resolves to just before each POST, connects to the address it
checked (no second resolution: DNS rebinding cannot aim it elsewhere), and never follows
redirects.

Signature: ``Jetrun-Signature: v1=<hex>``, the HMAC-SHA256 with the team's ``webhook_secret``
of ``<Jetrun-Timestamp>.<raw body>``; receivers recompute it, compare in constant time, and
reject old timestamps (see ``verify``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from runtime.infra.config import WebhookSettings

SIGNATURE_HEADER = "Jetrun-Signature"
TIMESTAMP_HEADER = "Jetrun-Timestamp"
DELIVERY_HEADER = "Jetrun-Delivery-Id"
MAX_URL = 2048

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationRefused(ValueError):
    """A callback URL or address the policy does not allow; the message says why."""


def check_callback_url(url: str, policy: WebhookSettings) -> tuple[str, int]:
    """The host and port of an acceptable callback URL; raises ``DestinationRefused``. An IP
    literal is checked against the policy at once; a name when it is resolved."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused("callback_url must be an http or https URL with a host")
    if len(url) > MAX_URL or parts.username is not None or parts.password is not None:
        raise DestinationRefused("callback_url must be at most 2048 characters, no user info")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DestinationRefused("callback_url has an invalid port") from None
    host = parts.hostname
    literal = _literal(host)
    if literal is not None:
        check_address(host, literal, policy)
    elif policy.only_allowed_hosts and not _host_listed(host, policy):
        raise DestinationRefused(f"callbacks may only go to the operator's allowed hosts: {host}")
    return host, port


def check_address(host: str, address: Address, policy: WebhookSettings) -> None:
    """Raise ``DestinationRefused`` unless ``host`` at ``address`` may be called."""
    if _host_listed(host, policy) or _address_listed(address, policy):
        return
    if policy.only_allowed_hosts:
        raise DestinationRefused(f"callbacks may only go to the operator's allowed hosts: {host}")
    if not policy.allow_private and not address.is_global:
        raise DestinationRefused(f"callbacks may not go to non-public address {address} ({host})")


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_listed(host: str, policy: WebhookSettings) -> bool:
    return host.lower().rstrip(".") in {h.lower().rstrip(".") for h in policy.allowed_hosts}


def _address_listed(address: Address, policy: WebhookSettings) -> bool:
    for entry in policy.allowed_hosts:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name
    return False


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Jetrun-Signature`` value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify(
    secret: str, timestamp: str, signature: str, body: bytes, now: float, tolerance_s: int = 300
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature)
