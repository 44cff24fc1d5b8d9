"""Deployment: `jax.export` artifacts of a trained model's predictor (`export`)."""
