"""Datasets for FLUID training: files, dataset_info.json registries, alpaca / sharegpt, chat templates."""
