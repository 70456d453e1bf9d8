"""Plain PyTorch blocks shared by the timm models and the detectron2 necks (no detectron2 import)."""
