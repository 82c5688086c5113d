"""Looking inside trained models: attention maps, attention rollout and mean attention distance."""
