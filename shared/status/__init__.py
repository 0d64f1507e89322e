"""The run status page: a read-only web page over one run folder (see docs/operations.md)."""
