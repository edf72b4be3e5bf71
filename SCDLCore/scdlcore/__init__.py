"""SCDLCore: semi-supervised CT organ segmentation with Semantic Class Distribution Learning (SCDL).

The package is the engine behind the ``scdl`` command and the SCDLSegment 3D Slicer module.
Sub-modules, one concept each (see the repository README for the full layout):

- :mod:`scdlcore.labels`      organ label tables (names, values, colors, terminology)
- :mod:`scdlcore.io`          CT and label-map reading/writing with exact geometry (SimpleITK)
- :mod:`scdlcore.preprocess`  resampling, HU window, body crop
- :mod:`scdlcore.nets`        the VNet backbone, built from a description
- :mod:`scdlcore.losses`      GADice and GACE (class-imbalance aware losses)
- :mod:`scdlcore.scdl`        the SCDL module (Gaussian class proxies, CDBA, SAC)
- :mod:`scdlcore.ssl`         semi-supervised bases (CPS, Mean Teacher, supervised only)
- :mod:`scdlcore.config`      the one typed training configuration
- :mod:`scdlcore.data`        training data: cached preprocessing, two-stream patch sampling
- :mod:`scdlcore.train`       the trainer
- :mod:`scdlcore.metrics`     Dice, HD95, ASD
- :mod:`scdlcore.cli`         the ``scdl`` command
"""

__version__ = "0.1.0"
