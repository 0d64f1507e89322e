"""fedscan: federated learning across hospitals for medical imaging."""

__version__ = "0.1.0"
