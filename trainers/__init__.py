"""negatron.trainers."""
