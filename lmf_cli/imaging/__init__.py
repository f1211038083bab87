"""Pixel operations on numpy images, shared by the API, training and evaluation: resampling and
the degradations of real files."""
