"""The modelpool broker: routes client requests to per-model worker processes (never imports TensorFlow)."""
