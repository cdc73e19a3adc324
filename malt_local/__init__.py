"""malt: MALT (Motwani et al., arXiv 2412.01928) training data, generated locally on llama.cpp."""

__version__ = "0.1.0"
__all__ = ["__version__"]
