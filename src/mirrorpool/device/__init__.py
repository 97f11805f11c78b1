"""The device: its data directory, metadata catalog and logical units."""
