"""Minimal stand-in for `timm`: only what MobileSAM's TinyViT imports (see ../README.md)."""
