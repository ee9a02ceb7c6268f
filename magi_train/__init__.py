"""magi: train and serve MAGI-1-class autoregressive video diffusion models."""
