"""Small helpers shared by the test modules."""

import random
import time

from presence_client import OnlinePage


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


def everyone(client, room: str = "", page_size: int = 0) -> OnlinePage:
    """Everyone online in `room`, every page walked into one (with the last page's counts)."""
    pages = list(client.iter_online(room=room, page_size=page_size))
    users = [user for page in pages for user in page.users]
    guests = [guest for page in pages for guest in page.guests]
    return OnlinePage(users, guests, pages[-1].user_count, pages[-1].guest_count, "")


def online(client, users=(), guests=(), room: str = "") -> bool:
    """Whether all these users and guests are online in `room` (CheckOnline)."""
    statuses = client.check_online(users, guests, room=room)
    return all(status.online for status in statuses.users + statuses.guests)
