"""skinlesion: a distributed training harness for dermoscopic skin-lesion classification."""

__version__ = "0.1.0"
