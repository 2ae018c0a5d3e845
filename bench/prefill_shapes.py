"""What a prompt step costs the first time MLX meets its shape, and the next time.

For each (batch, length) pair, in order: a fresh `BatchGenerator` takes `batch` random prompts of
`length` tokens and steps four times (the prompt step, the step that starts them, two decode
steps), twice over. On MLX's CUDA backend the first prompt step of a new shape builds what the
shape needs (cuDNN's attention graph among it, `MLX_CUDA_USE_CUDNN_SDPA=0` leaves that out); a
batch whose prefill groups vary meets such shapes where raw's fixed batch does not.

    python -m bench.prefill_shapes --preset qwen3-0.6b --out bench/results/

Writes `prefill-shapes-<preset>-<device>.md`. Run it in a fresh process: shapes met earlier in
the same process are not new.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import random
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator

from bench.run_throughput import default_device_label
from bench.synth import PRESET_NAMES, ensure_model, printable_token_ids

# (batch, length): new lengths at batch 1, then new batches at 64 tokens and the same token
# counts in other shapes (2 x 64 and 4 x 32 are both 128 tokens).
SHAPES = (
    (1, 65), (1, 66), (1, 100), (1, 128), (1, 200),
    (2, 64), (4, 32), (4, 64), (2, 128), (8, 64), (8, 65), (8, 66), (16, 64), (16, 70),
    (3, 64), (5, 64), (6, 64), (7, 64), (9, 64), (10, 64), (11, 64), (13, 64),
)  # fmt: skip


def steps_ms(model: Any, stream: Any, prompts: list[list[int]]) -> list[float]:
    """The four steps' times (ms) of a fresh BatchGenerator given `prompts`."""
    gen: Any = BatchGenerator(
        model,
        completion_batch_size=32,
        prefill_batch_size=32,
        prefill_step_size=2048,
        stream=stream,
    )
    try:
        gen.insert(prompts, max_tokens=[8] * len(prompts))
        out = []
        for _ in range(4):
            t0 = time.perf_counter()
            gen.next()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        gen.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="First-use cost of prompt-step shapes.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--models-dir", type=Path, default=Path("bench/.models"))
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--device-label", help="names the result file (default: from MLX)")
    args = p.parse_args(argv)
    path = ensure_model(args.preset, args.models_dir)
    model = mlx_load(str(path))[0]
    ids = printable_token_ids(path)
    rng = random.Random(0)
    stream = mx.new_stream(mx.default_device())

    def prompts(batch: int, length: int) -> list[list[int]]:
        return [[rng.choice(ids) for _ in range(length)] for _ in range(batch)]

    for _ in range(2):  # everything a first step of any shape builds once
        steps_ms(model, stream, prompts(1, 64))
    rows = []
    for batch, length in SHAPES:
        first = steps_ms(model, stream, prompts(batch, length))
        again = steps_ms(model, stream, prompts(batch, length))
        rows.append(
            f"| {batch} | {length} | {first[0]:.1f} | {again[0]:.1f} | {first[1]:.1f} "
            f"| {again[1]:.1f} |"
        )
        print(rows[-1], flush=True)
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")} or "defaults"
    label = args.device_label or default_device_label()
    lines = [
        f"# First use of prompt-step shapes — `{args.preset}` on `{label}`",
        "",
        f"mlx {importlib.metadata.version('mlx')}; MLX environment: {env}. Step times in ms.",
        "",
        "| batch | length | prompt step, first | again | start step, first | again |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"prefill-shapes-{args.preset}-{label}.md"
    dest.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
