"""The built-in reasoning world: problems whose success depends on the plan (tasks.py) and the tiny
base model fine-tuned on them (tiny_model.py, built into models/tiny-world). `python train.py`
trains on it."""
