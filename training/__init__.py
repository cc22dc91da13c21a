"""Training of the three DiffPortrait3D stages (torch + accelerate, outside Blender)."""
