"""Stand-in for torchvision (see tests/stubs/README.md)."""
