"""What the rollout actors and the learner share: the engine interface, rollout rows, weight transports."""
