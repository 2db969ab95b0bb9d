"""Measuring samples: the FID Inception-v3 (`inception`) and its weights (`inception_weights`,
read without torch through `torch_checkpoint`), and distances between feature sets
(`feature_distances`: FID, KID)."""
