"""bigtrain: train transformer language models from one CPU core to many GPU nodes with one recipe."""

__version__ = "0.1.0"
