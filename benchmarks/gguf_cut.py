"""Cut a llama GGUF down to its first N layers (tokenizer, embeddings and output kept), for carrying a small
but real model to a machine that cannot download one, such as the GPU test machine (64 MiB per call).

The cut model answers nonsense, but loads, tokenizes and runs every kernel the full one does: enough to show
whether a llama.cpp build crashes on that CPU and how fast it is there.

    python benchmarks/gguf_cut.py SmolLM2-135M-Instruct.Q4_1.gguf cut.gguf --layers 4
Needs numpy and gguf-py (the `gguf` package, or the gguf-py folder of the pinned llama.cpp tree on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gguf


def cut(src: Path, dst: Path, layers: int) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == block_count else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    keep = [t for t in reader.tensors if not (m := re.match(r"blk\.(\d+)\.", t.name)) or int(m.group(1)) < layers]
    for t in keep:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in keep:
        writer.write_tensor_data(t.data)
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    cut(args.src, args.dst, args.layers)
    print(f"{args.dst}: {args.dst.stat().st_size / 2**20:.1f} MiB, {args.layers} layers")


if __name__ == "__main__":
    main()
