"""MixDQ (Zhao et al., 2024): metric-decoupled layer sensitivity and integer-programming bit allocation,
the static mixed-precision baseline (docs/mixdq.md): `groups` (content / quality layers), `sensitivity`
(one layer quantized at a time, the rest FP), `allocation` (the integer program and its baselines)."""
