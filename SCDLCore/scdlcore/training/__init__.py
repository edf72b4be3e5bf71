"""Training.

The configuration, cached training data and patch sampling, the trainer and its checkpoints, losses, SCDL,
the semi-supervised bases and fine-tuning.
"""
