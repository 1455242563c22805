"""HICRA on TRL's GRPOTrainer (hicra_trl.py) and its launcher (train_trl.py): one CPU to many
GPUs."""
