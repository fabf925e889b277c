"""negatron.serve."""
