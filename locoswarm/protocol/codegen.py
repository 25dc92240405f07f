"""Regenerate (or check) the committed Python code for ``locoswarm.proto``.

``python -m locoswarm.protocol.codegen`` rewrites ``protocol/_gen/``; with ``--check`` it only
reports whether the committed files match what the installed grpcio-tools would write. Needs the
``grpcio-tools`` package (a test dependency), imported only here.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO = Path(__file__).with_name("locoswarm.proto")
GEN_DIR = Path(__file__).with_name("_gen")
GENERATED = ("locoswarm_pb2.py", "locoswarm_pb2.pyi", "locoswarm_pb2_grpc.py")
_INIT = '"""Generated from ../locoswarm.proto by ``python -m locoswarm.protocol.codegen``."""\n'


def generate() -> dict[str, str]:
    """Run protoc on the .proto; return generated file name -> text, imports made relative."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO.parent}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out = {name: (Path(tmp) / name).read_text() for name in GENERATED}
    # grpc_tools writes an absolute `import locoswarm_pb2`; the package needs a relative import.
    out["locoswarm_pb2_grpc.py"] = re.sub(
        r"^import locoswarm_pb2 as",
        "from . import locoswarm_pb2 as",
        out["locoswarm_pb2_grpc.py"],
        flags=re.M,
    )
    out["__init__.py"] = _INIT
    return out


def stale_files() -> list[str]:
    """Names of generated files whose committed text differs from a fresh generation."""
    fresh = generate()
    return [
        name
        for name, text in fresh.items()
        if not (GEN_DIR / name).is_file() or (GEN_DIR / name).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locoswarm.protocol.codegen")
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated files in {GEN_DIR}: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    GEN_DIR.mkdir(exist_ok=True)
    for name, text in generate().items():
        (GEN_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
