"""How artifacts are archived: gzip against a plain tar, on model weights and on an
adapter-sized directory, side by side in one run (figures go in docs/performance.md).

Weights are random normal at a trained model's scale (std 0.02) in bf16 and fp32,
saved as safetensors: what a full-weight job's `model` artifact mostly is. For each:
the archive's size relative to the files, and the MB of files archived per second,
with the sha256 computed while writing as the worker does (core.service.storage).

    python benchmarks/bench_archive.py [--mb 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.service.storage import make_archive


def directory_of(root: Path, name: str, dtype: torch.dtype, megabytes: float) -> Path:
    directory = root / name
    directory.mkdir()
    per_element = torch.tensor([], dtype=dtype).element_size()
    columns = 2048
    rows = max(1, int(megabytes * 1e6 / per_element / columns))
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(rows, columns, generator=generator) * 0.02).to(dtype)
    save_file({"weight": weight}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "llama"}')
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=128, help="Size of the weights, MB.")
    args = parser.parse_args()
    print("| files | size | format | archive / files | MB/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [
            ("bf16 weights", directory_of(root, "bf16", torch.bfloat16, args.mb)),
            ("fp32 weights", directory_of(root, "fp32", torch.float32, args.mb)),
            ("adapter (fp32)", directory_of(root, "adapter", torch.float32, 2)),
        ]
        for label, directory in cases:
            size = sum(p.stat().st_size for p in directory.iterdir())
            for suffix in ("tar.gz", "tar"):
                archive = root / f"{directory.name}.{suffix}"
                started = time.perf_counter()
                make_archive(directory, archive)
                seconds = time.perf_counter() - started
                ratio = archive.stat().st_size / size
                print(
                    f"| {label} | {size / 1e6:.0f} MB | .{suffix} | {ratio:.3f} "
                    f"| {size / 1e6 / seconds:.0f} |"
                )
                archive.unlink()


if __name__ == "__main__":
    main()
