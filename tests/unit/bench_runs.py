"""One measured run of a bench point, as the bench's report and pool tests need them."""

from __future__ import annotations

from bench.metrics import PointStats


def run_at(tok_s: float, *, concurrency: int = 2, output_tokens: int = 256) -> PointStats:
    """A run that made `output_tokens` at `tok_s`, its latencies fixed."""
    return PointStats(
        concurrency=concurrency,
        requests=4,
        errors=0,
        output_tokens=output_tokens,
        wall_s=output_tokens / tok_s,
        output_tok_s=tok_s,
        ttft_p50_ms=30.0,
        ttft_p99_ms=40.0,
        ttft_mean_ms=31.0,
        itl_p50_ms=8.0,
        itl_p99_ms=12.0,
        tpot_mean_ms=8.5,
        chunks_per_token=1.0,
    )
