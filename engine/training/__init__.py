"""Training: samples from prepared tiles and the Ray Train loop (pretraining and fine-tuning)."""
