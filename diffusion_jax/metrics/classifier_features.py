"""A small classifier of the real data, whose hidden features judge generated images.

FID's Inception network was trained on ImageNet photographs at 299 x 299; for 8 x 8 digits its
features say little. A multilayer perceptron trained on the run's own labelled images knows
what matters in them: the Fréchet distance between its last hidden layer's features of two
image sets compares them the way FID does, and its predictions tell whether a conditional
sample is of the class it was asked for.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Classifier(NamedTuple):
  weights: list  # [D_in, H1], [H1, H2], ... [H_last, num_classes]
  biases: list

  def hidden(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float64 [N, H_last], the last hidden layer's (ReLU) activations."""
    h = _flat(images)
    for w, b in zip(self.weights[:-1], self.biases[:-1]):
      h = np.maximum(h @ w + b, 0.0)
    return h

  def predict(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> int64 [N], the most likely class."""
    return np.argmax(self.hidden(images) @ self.weights[-1] + self.biases[-1], axis=1)


def _flat(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'the classifier takes uint8 images [N, H, W, C], got {images.dtype} '
                     f'{images.shape}.')
  return images.reshape(len(images), -1).astype(np.float64) / 255.0


def train_classifier(images: np.ndarray, labels: np.ndarray, *, hidden=(128, 64),
                     seed: int = 0, max_iter: int = 400) -> Classifier:
  """A ReLU MLP (scikit-learn's, Adam) fitted to uint8 images [N, H, W, C] and labels [N]."""
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), max_iter=max_iter, random_state=seed)
  clf.fit(_flat(images), np.asarray(labels))
  if list(clf.classes_) != list(range(len(clf.classes_))):
    raise ValueError(f'labels must be 0 .. num_classes - 1, got classes {clf.classes_[:10]}.')
  return Classifier([np.asarray(w) for w in clf.coefs_], [np.asarray(b) for b in clf.intercepts_])
