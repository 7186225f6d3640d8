"""Reports: plots (matplotlib, written as PNG into a run directory) and Markdown."""
