"""Dataset folders: the manifest, the locked store the annotation loop writes to, and case suggestions."""
