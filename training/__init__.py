"""Training a FaceStudio adapter (issue 17): the trainable adapter, the objective and the training loop."""
