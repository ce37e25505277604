"""aae-ray: visual inspection with few defects (AAE + Hotelling's T², tuned with Ray)."""

__version__ = "0.1.0"
