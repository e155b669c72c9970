"""Training: CAPGConfig (the hyperparameters), the rollout, CAPGTrainer (the loop), checkpoints, run logs."""
