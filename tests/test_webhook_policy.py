"""Webhook rules (pure): callback URLs, destinations, signatures."""

from __future__ import annotations

import ipaddress

import pytest

from runtime.control.webhook_policy import (
    DestinationRefused,
    check_address,
    check_callback_url,
    sign,
    verify,
)
from runtime.infra.config import WebhookSettings

PUBLIC = WebhookSettings()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "example.com/hook",
        "http:///nohost",
        "https://user:pw@example.com/",
        "http://example.com:99999/",
        "http://" + "a" * 2050 + ".com/",
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/",
        "http://[::1]/",
    ],
)
def test_bad_or_private_callback_urls_are_refused(url: str) -> None:
    with pytest.raises(DestinationRefused):
        check_callback_url(url, PUBLIC)


def test_public_urls_pass_and_names_are_checked_when_resolved() -> None:
    assert check_callback_url("https://hooks.example.com/x?y=1", PUBLIC) == (
        "hooks.example.com",
        443,
    )
    assert check_callback_url("http://93.184.216.34:8080/", PUBLIC) == ("93.184.216.34", 8080)
    with pytest.raises(DestinationRefused, match="non-public"):
        check_address("internal.example", ipaddress.ip_address("192.168.1.5"), PUBLIC)


def test_the_operator_allows_hosts_and_networks_or_only_those() -> None:
    policy = WebhookSettings(allowed_hosts=["127.0.0.1", "10.0.0.0/8", "hooks.internal"])
    check_callback_url("http://127.0.0.1:9000/hook", policy)
    check_address("svc", ipaddress.ip_address("10.2.3.4"), policy)
    check_address("hooks.internal", ipaddress.ip_address("192.168.0.9"), policy)
    only = WebhookSettings(allowed_hosts=["hooks.internal"], only_allowed_hosts=True)
    with pytest.raises(DestinationRefused, match="only"):
        check_callback_url("https://example.com/", only)
    check_callback_url("https://hooks.internal/", only)
    anywhere = WebhookSettings(allow_private=True)
    check_callback_url("http://127.0.0.1/", anywhere)


def test_signatures_verify_and_expire() -> None:
    body = b'{"id":"run_1"}'
    signature = sign("s3cret-s3cret-s3cret", 1_700_000_000, body)
    assert signature.startswith("v1=") and len(signature) == 3 + 64
    assert verify("s3cret-s3cret-s3cret", "1700000000", signature, body, now=1_700_000_100)
    assert not verify("s3cret-s3cret-s3cret", "1700000000", signature, body + b" ", 1_700_000_100)
    assert not verify("another-secret-xxxx", "1700000000", signature, body, 1_700_000_100)
    assert not verify("s3cret-s3cret-s3cret", "1700000000", signature, body, 1_700_000_400)
    assert not verify("s3cret-s3cret-s3cret", "soon", signature, body, 1_700_000_100)
