"""Figures (matplotlib, pyplot-free: nothing stays open)."""

from xattn_lightning.viz.heatmap import figure_to_array, figure_to_png, grid_figure, heatmap_figure, history_figure

__all__ = ["figure_to_array", "figure_to_png", "grid_figure", "heatmap_figure", "history_figure"]
