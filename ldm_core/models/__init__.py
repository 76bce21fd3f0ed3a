"""Model weights as files: pretrained weights found offline, model folders checked before loading, the latent scale."""
