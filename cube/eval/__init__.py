"""Evaluation: retrieval metrics, predictions of a trained cube, the baselines, the comparison report and analysis."""
