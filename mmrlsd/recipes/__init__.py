"""Recipes built from the training blocks: supervised fine-tuning (`sft`)."""
