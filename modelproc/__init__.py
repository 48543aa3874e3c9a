"""Model worker processes: one spawned interpreter per model replica (TensorFlow lives only here)."""
