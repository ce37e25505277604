"""Data: the image table, its importers and the label convention.

One label convention for the whole project: 1 = defect, 0 = normal, None = unknown (DESIGN.md's `truth`).
Other conventions (Deep SAD's +1/-1, sklearn's -1 = outlier) are translated where data comes in.
"""

DEFECT = 1
NORMAL = 0
SPLITS = ("train", "val", "test", "pool")
