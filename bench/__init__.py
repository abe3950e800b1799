"""The benchmark suite (``make bench``): decoding, training step, data loader, COCO evaluation, GPU.

Every module is runnable alone (``.venv/bin/python bench/<module>.py --json``) and exposes
``main(argv) -> int``; :mod:`bench.run_all` runs them and aggregates ``reports/bench.json``.
"""
