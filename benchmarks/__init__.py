"""GPU benchmarks of triton_gg and pallas_gg against the anchors (ANCHORS.md)."""
