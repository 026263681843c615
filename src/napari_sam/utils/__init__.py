"""Helpers: resizing transforms, image conversion, mask utilities."""
