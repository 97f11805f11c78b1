"""Mirroring: the per-primary sequencer, changed-block tracking and the backup pool."""
