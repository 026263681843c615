"""napari adapters: the only modules of napari-sam that import napari, magicgui or qtpy.

Importing this package itself imports nothing from them; its submodules do.
"""
