"""soce: category-aware model souping (SoCE, Maiti et al. 2025, arXiv 2511.13254)."""

__version__ = "0.1.0"
