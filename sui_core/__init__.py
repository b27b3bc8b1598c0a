"""sui: smooth unique information of training samples for linearized networks."""

__version__ = "0.1.0"
