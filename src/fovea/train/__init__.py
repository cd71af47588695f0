"""Training: recipes, freeze policy, checkpoints, data and synthetic documents."""
