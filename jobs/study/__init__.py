"""Studies: grids of pretrain -> finetune/evaluate cells over subsets, seeds and settings, with a report."""
