"""Training with Composer: recipes, the ComposerModel, the trainer builder, callbacks and the train step.

    from micro_diffusion.training import train
    run = train("recipes/demo_masked.yaml", {"train.max_duration": "3ba"})   # -> Run(run_dir, checkpoint, totals)
"""
from .stage import Prediction, Run, distill, dry_run, train

__all__ = ["Prediction", "Run", "distill", "dry_run", "train"]
