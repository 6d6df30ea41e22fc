"""Trainers: Stage I (strictly causal alignment) and Stage II (the K-head) on the HF Trainer."""
