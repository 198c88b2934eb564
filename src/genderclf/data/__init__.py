"""Data: dataset sources and layouts, validation, split, offline augmentation, TFRecords."""
