"""Small helpers shared by the test modules."""

import random
import time


def eventually(check, timeout: float = 3.0, interval: float = 0.02):
    """Polls `check` until it returns something truthy or `timeout` passes; returns its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def random_ipv4() -> str:
    """A random private address: just a name here, never contacted."""
    return "10.{}.{}.{}".format(*random.sample(range(1, 255), 3))


def random_group() -> int:
    """A random non-zero IPv6 group, to make documentation addresses unique."""
    return random.randrange(0x1000, 0xFFFF)


def by_bytes(names):
    """The server's order: ascending by UTF-8 bytes."""
    return sorted(names, key=lambda name: name.encode())
