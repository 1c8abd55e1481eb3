"""The method: MoCHi's mixing, MoCo-v2's loss and queue, the encoders, and one training step (torch only)."""
