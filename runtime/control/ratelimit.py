"""Per-token request rate limits: one token bucket per bearer token, pure (the caller passes
the time), so the gateway and its tests share one implementation.

A bucket holds up to ``burst`` requests and refills at ``rate`` per second; a request takes one.
Keys are digests of configured tokens only (checked after authentication), so the number of
buckets is bounded by the config, whatever clients send.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # requests per second
    burst: float  # most requests at once
    level: float
    updated: float

    def take(self, now: float) -> float:
        """Take one request: 0.0 if allowed, else the seconds until one would be."""
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.burst, self.level + elapsed * self.rate)
        self.updated = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class RateLimiter:
    """``check(key, now)``: 0.0 when the request may go on, else its Retry-After in seconds.
    ``rate <= 0`` turns limiting off. Not thread safe (one event loop)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, max(1.0, burst)
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str, now: float) -> float:
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
        return bucket.take(now)
