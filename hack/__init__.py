"""Developer and test tooling for crib (test images, local registry, benchmarks)."""
