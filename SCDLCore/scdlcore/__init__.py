"""SCDLCore: semi-supervised CT organ segmentation with Semantic Class Distribution Learning (SCDL).

The engine behind the ``scdl`` command (:mod:`scdlcore.cli`) and the SCDLSegment 3D Slicer module. Its
sub-packages follow the pipeline: ``io``, ``training``, ``inference``, ``evaluation``, ``visualize``,
``bundle`` and ``dataset``, with the pieces every stage shares at the top; the repository README's
"Layout" section describes each module.
"""

__version__ = "0.1.0"
