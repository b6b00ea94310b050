"""Training with Composer: recipes, the ComposerModel, the trainer builder, callbacks and the train command."""
