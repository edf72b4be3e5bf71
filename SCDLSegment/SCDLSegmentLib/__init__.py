"""Slicer-free helpers of the SCDLSegment module (nothing here imports slicer, qt, ctk or vtk).

One concern per module, so each is tested directly with plain Python:

- :mod:`SCDLSegmentLib.process`       child processes whose stdout carries JSON, read without blocking the GUI;
                                      cancel kills the whole process tree
- :mod:`SCDLSegmentLib.worker`        client of ``scdl worker`` (JSON-lines protocol version 1)
- :mod:`SCDLSegmentLib.engine`        the command lines and environment that start the ``scdl`` engine
- :mod:`SCDLSegmentLib.jobs`          one-shot listings and fine-tuning runs, turned into outcomes
- :mod:`SCDLSegmentLib.catalog`       reading the engine's model, dataset and suggestion listings
- :mod:`SCDLSegmentLib.progress`      engine events turned into progress states and text for the panel
- :mod:`SCDLSegmentLib.labelmap`      organ label table <-> segments: which segment is which organ, label maps
- :mod:`SCDLSegmentLib.settings`      persistent panel settings, the device choice, where ``scdlcore`` lives
- :mod:`SCDLSegmentLib.dependencies`  which Python packages are missing, without importing them
"""
