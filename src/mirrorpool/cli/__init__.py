"""The `mirrorpool` command: one module per command group."""
