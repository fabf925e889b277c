"""negatron.tune."""
