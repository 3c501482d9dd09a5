"""VisionDrop core: schedules, the pruning math, model loading and the pipeline units."""
