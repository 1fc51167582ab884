"""Implementations of :class:`aldaas.pool.Source` (directory, S3) and the backup formats they hold."""
