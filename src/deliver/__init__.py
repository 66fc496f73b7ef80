"""Delivering a trained model: predict on new lesions, export a bundle, its model card."""
