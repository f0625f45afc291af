"""Foundations every other layer uses: the one-line user errors, durable atomic file writes, checksums taken as
files are written, the one deserialisation policy for every file bigtrain reads, and what this machine's hardware
can do. Imports nothing else of bigtrain."""
