"""Training: one trainer loop, the pretrain and finetune tasks, their sessions (Ray Train or in process), optimizer,
checkpoints, metrics and lineage."""
