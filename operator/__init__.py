"""hps-operator control plane: EmbeddingModel spec, placement planner, renderers and the kopf operator."""
