"""What the scores are used for and checked against: mislabel detection and its baselines (detection,
baselines, evaluation), data summarization, robustness of the scores, and validation against real
retraining (validation)."""
