"""The zoo on disk: the layout object, durable primitives, host state, backups."""
