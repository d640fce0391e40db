"""Figures (matplotlib, pyplot-free: nothing stays open)."""

from xattn_lightning.viz.heatmap import figure_to_array, grid_figure, heatmap_figure

__all__ = ["figure_to_array", "grid_figure", "heatmap_figure"]
