"""Training from the store: reward models, DPO, KTO (TRL) and PPO (ours). See each module's docstring."""
