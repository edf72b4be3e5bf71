"""Model bundles (the file format) and the registry of installed model versions."""
