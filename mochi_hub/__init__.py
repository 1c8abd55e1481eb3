"""mochi-hub: MoCHi (Kalantidis et al., NeurIPS 2020) for timm backbones."""

__version__ = "0.1.0"
