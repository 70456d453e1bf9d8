"""Plain PyTorch building blocks shared by the timm models and the detectron2 necks.

Nothing here imports detectron2, so these modules can be tested and reused without it.
"""
