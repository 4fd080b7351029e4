"""A small Python client for Presence (gRPC service presence.v1.Presence).

    from presence_client import PresenceClient

    with PresenceClient("localhost:50051") as presence:
        presence.report_user("alice")
        presence.report_guest("2001:db8::1")
        online = presence.list_online(limit=10)
        print(online.users, online.user_count)

Failures are grpc.RpcError: `e.code()` is StatusCode.INVALID_ARGUMENT for a bad
name or address (`e.details()` names the field), UNAVAILABLE when Presence or
its Redis is down, DEADLINE_EXCEEDED past the deadline, UNAUTHENTICATED or
PERMISSION_DENIED without the right token.

A secured server (TLS, tokens): PresenceClient("presence:50051", token=TOKEN,
ca_file="ca.pem"), and for mutual TLS client_cert_file= and client_key_file=.
The token is sent as `authorization: Bearer TOKEN` on every call.

From a shell:  python presence_client.py --target HOST:PORT user alice | guest IP | list
(--token and --ca default to $PRESENCE_TOKEN and $PRESENCE_CA_FILE.)
The stubs are generated from the proto first: `python generate.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable

import grpc

try:
    from presence.v1 import presence_pb2, presence_pb2_grpc
except ImportError as error:  # the stubs are build output, not committed
    raise ImportError("no generated stubs: run `python generate.py` in examples/python") from error


@dataclasses.dataclass(frozen=True)
class Online:
    """Who is online: the first `limit` names of each kind, and the full counts."""

    users: list[str]
    guests: list[str]
    user_count: int
    guest_count: int


def open_channel(
    target: str,
    *,
    ca_file: str | None = None,
    client_cert_file: str | None = None,
    client_key_file: str | None = None,
) -> grpc.Channel:
    """A channel to `target`: TLS trusting `ca_file` when given (with a client
    certificate for mutual TLS), else plaintext."""
    if ca_file is None:
        return grpc.insecure_channel(target)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(client_key_file), certificate_chain=read(client_cert_file)
    )
    return grpc.secure_channel(target, credentials)


class PresenceClient:
    """One channel to a Presence server; safe to share between threads."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 2.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
    ):
        if channel is None:
            channel = open_channel(
                target, ca_file=ca_file, client_cert_file=client_cert_file, client_key_file=client_key_file
            )
        self._channel = channel
        self._stub = presence_pb2_grpc.PresenceStub(self._channel)
        # Every call gets a deadline: without one a call to a hung server waits forever.
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def report_user(self, username: str, *, timeout: float | None = None) -> None:
        request = presence_pb2.ReportUserRequest(username=username)
        self._stub.ReportUser(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_guest(self, ip_address: str, *, timeout: float | None = None) -> None:
        request = presence_pb2.ReportGuestRequest(ip_address=ip_address)
        self._stub.ReportGuest(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_batch(
        self, usernames: Iterable[str] = (), ip_addresses: Iterable[str] = (), *, timeout: float | None = None
    ) -> None:
        """All or nothing: one bad entry rejects the whole batch."""
        request = presence_pb2.ReportBatchRequest(usernames=list(usernames), ip_addresses=list(ip_addresses))
        self._stub.ReportBatch(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def list_online(self, limit: int = 0, *, timeout: float | None = None) -> Online:
        """Users and guests sorted ascending by bytes; limit 0 means all."""
        request = presence_pb2.ListOnlineRequest(limit=limit)
        reply = self._stub.ListOnline(request, timeout=self._deadline(timeout), metadata=self._metadata)
        return Online(list(reply.users), list(reply.guests), reply.user_count, reply.guest_count)

    # Non-blocking variants, for callers that must not wait (the web middleware):
    # they return a grpc.Future at once; its exception() is None on success.
    def report_user_future(self, username: str, *, timeout: float | None = None) -> grpc.Future:
        request = presence_pb2.ReportUserRequest(username=username)
        return self._stub.ReportUser.future(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def report_guest_future(self, ip_address: str, *, timeout: float | None = None) -> grpc.Future:
        request = presence_pb2.ReportGuestRequest(ip_address=ip_address)
        return self._stub.ReportGuest.future(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PresenceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Report to and list a Presence server.")
    parser.add_argument("--target", default=os.environ.get("PRESENCE_TARGET", "localhost:50051"))
    parser.add_argument("--token", default=os.environ.get("PRESENCE_TOKEN"), help="a bearer token")
    parser.add_argument("--ca", default=os.environ.get("PRESENCE_CA_FILE"), help="TLS: the server's CA (PEM)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("user", help="report a signed-in user").add_argument("username")
    commands.add_parser("guest", help="report a guest by IP address").add_argument("ip_address")
    commands.add_parser("list", help="print who is online, as JSON").add_argument("--limit", type=int, default=0)
    args = parser.parse_args(argv)

    with PresenceClient(args.target, token=args.token or None, ca_file=args.ca or None) as presence:
        try:
            if args.command == "user":
                presence.report_user(args.username)
            elif args.command == "guest":
                presence.report_guest(args.ip_address)
            else:
                print(json.dumps(dataclasses.asdict(presence.list_online(args.limit))))
        except grpc.RpcError as error:
            print(f"presence: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
