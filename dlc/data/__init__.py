"""Bundled data sets and loaders: a train block's `data = ...` becomes numpy arrays."""
from dlc.data.sources import (Dataset, batches, fit_inputs, fit_labels, load_dataset, normalization,
                      normalize)

__all__ = ["Dataset", "batches", "fit_inputs", "fit_labels", "load_dataset", "normalization",
           "normalize"]
