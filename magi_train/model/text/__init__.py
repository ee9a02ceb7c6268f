"""Text encoders of the DiT's captions: the released T5 (with MAGI-1's caption cleaning) and the hash
encoder of the synthetic data."""
