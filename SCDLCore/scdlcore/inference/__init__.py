"""Inference: the predictor and batch segmentation.

The predictor does the preprocessing, the sliding window, the postprocessing and the return to the input grid.
"""
