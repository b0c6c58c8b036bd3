"""edgedistill: distil a ResNet teacher into a small student and ship it to the edge."""

__version__ = "0.1.0"
