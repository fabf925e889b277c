"""negatron.cluster."""
