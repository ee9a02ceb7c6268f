"""What a run reports about itself: metrics logging, throughput and MFU, step phases, FLOP and memory models."""
