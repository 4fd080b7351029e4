"""Generates the Python gRPC stubs from the proto with grpcio-tools.

    python generate.py

writes presence/v1/presence_pb2.py, presence_pb2.pyi and presence_pb2_grpc.py
beside this file. They are build output: gitignored, never edited, made again
from the proto whenever the tests run (conftest.py calls generate()).
"""

import importlib.resources
import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
PROTO = PROTO_ROOT / "presence" / "v1" / "presence.proto"
# google/protobuf/timestamp.proto and the other well-known types ship inside
# grpcio-tools; `python -m grpc_tools.protoc` adds them, protoc.main() does not.
WELL_KNOWN = importlib.resources.files("grpc_tools") / "_proto"


def generate(out: pathlib.Path = HERE) -> None:
    # -I is the proto root, so the stubs import each other as `presence.v1.…`,
    # matching the proto package, and `out` becomes their import root.
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{WELL_KNOWN}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {status})")


if __name__ == "__main__":
    generate()
    print(f"generated stubs for {PROTO.relative_to(PROTO_ROOT)} in {HERE / 'presence'}", file=sys.stderr)
