"""Benchmarks and their shared discipline: fixed threads, warm-up, repeats, interleaved A/B
runs in separate processes, medians with min-max, ratios within one run, machine info."""
