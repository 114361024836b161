"""Benchmarks: scripts that start a real broker and measure it (not tests). See bench/README.md."""
