"""Data: OGB datasets, a mirror, hop-2 edges, augmentation."""
