"""locoswarm: a peer-to-peer training daemon for PyTorch (NoLoCo, DiLoCo, compressed exchanges)."""

__version__ = "0.1.0"
