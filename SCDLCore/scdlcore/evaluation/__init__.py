"""Evaluation: Dice, HD95 and ASD per organ on the native grid."""
