"""surgeon: find every strided convolution and pooling layer in a PyTorch model and replace it by policy."""

__version__ = "0.1.0"
