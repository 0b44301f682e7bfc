"""Datasets: the ``labels.csv`` format, the offline synthetic benchmark, and loaders for real dataset formats."""
