"""MILK10k skin-lesion classification: data, training, blending and submission."""
