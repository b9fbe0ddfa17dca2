"""The paper's science, as plain functions and modules: data splits, triggers, models, training, metrics, the
noise augmentation of Algorithm 1, the CycleGAN of Algorithm 2, and ONNX export. PyTorch lives here."""
