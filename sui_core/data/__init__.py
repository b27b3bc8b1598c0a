"""Data: the sources (sources, text), splitting, label noise and subclass merging, prepared Parquet
splits (splits), and adversarial corruption (adversarial)."""
