"""PNG figures: segmentation overviews, score plots and training curves."""
